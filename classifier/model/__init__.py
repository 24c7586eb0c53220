"""The logged model: a checkpoint rebuilt into a network that takes raw images and answers labels and probabilities."""
