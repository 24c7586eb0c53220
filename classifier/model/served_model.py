"""The file MLflow logs as the model's code (models from code): loading a logged classifier unpickles nothing."""

from mlflow.models import set_model

from classifier.model.pyfunc import ClassifierModel

set_model(ClassifierModel())
