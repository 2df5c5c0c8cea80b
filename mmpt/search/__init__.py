"""Search over ``mmpt embed`` folders: a FAISS index with its metadata (``mmpt index``) and an HTTP service
with a web page that embeds queries of any modality the model has (``mmpt serve``).

    build.py     embed folders -> INDEX_DIR (exact or compressed index, metadata parquet, manifest); resumable
    members.py   where each sample's tar members lie in its shard, and reading one back by offset
    store.py     an opened INDEX_DIR: search, metadata rows, members of a hit
    query.py     a query (typed text or uploaded file) through the model's own data side, micro-batched
    app.py       the FastAPI application: JSON API, clip-retrieval's /knn-service, the web page
"""
