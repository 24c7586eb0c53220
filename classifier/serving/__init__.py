"""Answering with a trained model: batch prediction over files and the HTTP service."""
