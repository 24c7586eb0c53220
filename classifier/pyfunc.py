"""Where models logged before the package was regrouped find their code: their `served_model.py` imports
`classifier.pyfunc.ClassifierModel`, which resolves here in a process that has already imported this package."""

from classifier.model.pyfunc import ClassifierModel

__all__ = ["ClassifierModel"]
