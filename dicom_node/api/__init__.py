"""The admin API (FastAPI): health, metrics, jobs, series, associations, audit; bearer tokens with roles."""
