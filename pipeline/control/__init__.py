"""Control: a falcon API (served by gunicorn) that reports what every stage is doing."""
