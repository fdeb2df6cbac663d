"""A Python client and the `image-search` command for a running image search service (HTTP only).

    from image_search_client import ImageSearchClient
    client = ImageSearchClient("http://127.0.0.1:8000")
    client.search(["cat.jpg", "a dog on a beach"], k=5)

It imports nothing of the server: it needs only `requests`, so it works against a service anywhere.
"""

from image_search_client.client import ClientError, ImageSearchClient, WeightedQuery

__all__ = ["ClientError", "ImageSearchClient", "WeightedQuery"]
