"""Writes over HTTP (POST /images, DELETE /images/{id}): auth, keys, batch planning, the commit.

- `auth`: the write token (file or environment), checked in constant time.
- `keys`: a client's key checked, or the content-addressed default key.
- `plan`: pure planning of one group of writes against the live records (ids, outcomes, deletions).
- `commit`: one group commit under the index's commit lock, durable before it returns, and recovery.
- `group`: the asyncio queue that turns writes arriving together into one commit.
"""
