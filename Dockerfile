FROM python:3.12-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY chatapp ./chatapp
COPY presence ./presence
RUN pip install --no-cache-dir .
COPY manage.py ./
COPY templates ./templates
COPY static ./static
EXPOSE 8000
CMD ["python", "-m", "chatapp.node", "-b", "0.0.0.0", "-p", "8000", "chatapp.asgi:application"]
