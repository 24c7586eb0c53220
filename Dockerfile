# One image for the MLflow server and the search workers of docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY classifier ./classifier
RUN pip install --no-cache-dir .
COPY MLproject conda.yaml ./
COPY experiments ./experiments
