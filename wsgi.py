"""WSGI entry point: ``gunicorn wsgi:app`` (config from ``B24SMS_CONFIG``)."""

from b24sms import create_app

app = create_app()
