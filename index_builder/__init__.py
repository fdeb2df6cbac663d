"""Offline index builds: a folder or S3 prefix of images -> an index artifact (see serve_app.artifact)."""
