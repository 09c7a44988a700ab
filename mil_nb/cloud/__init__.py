"""SageMaker: the job bundle, training jobs, tuning, deployment, cross-validation and Processing jobs."""
