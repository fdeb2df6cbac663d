"""Offline index builds: a folder or S3 prefix of images -> an index artifact (see image_search.artifact)."""
