"""The library the index builder and the service share.

CLIP encoding, image decoding and preprocessing, the manifest, the FAISS index, the versioned
artifact, storage (folder / S3) and index choice. It imports neither `serve_app` nor
`index_builder`: arrows point down only.
"""
