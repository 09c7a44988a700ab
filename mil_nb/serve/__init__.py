"""Serving: prediction for a request, its wire formats, the HTTP server and SageMaker's handlers."""
