"""The twin API and the live page: the digital twin's network face (replaces Realm Device Sync).

``create_app(fdb, settings)`` builds the FastAPI app; ``factory-assets api`` serves it on
127.0.0.1:8000. See docs/api-usage.md.
"""
