"""Resources shared by every domain."""

from typing import Optional

import dagster as dg
from pydantic import Field


class MongoResource(dg.ConfigurableResource):
    """The factory's MongoDB. ``uri`` unset: ``MONGODB_URI`` from the environment of
    the process that runs the step, else the embedded SecantusDB daemon's discovery
    file, so webserver, daemon and run workers all reach the same server.
    The URI may carry credentials: it is never logged nor put in metadata."""

    uri: Optional[str] = Field(default=None, description="MongoDB URI; default MONGODB_URI or the embedded daemon")
    database: Optional[str] = Field(default=None, description="database; default MONGODB_DATABASE or smart_factory")

    def fdb(self):
        from factory_assets.storage.mongo import connect

        return connect(self.uri, self.database)

    def describe(self) -> str:
        """Where data lives, without credentials, for metadata."""
        from factory_assets.storage.mongo import redact_uri, resolve_uri

        fdb = self.fdb()
        return f"{redact_uri(resolve_uri(self.uri))} db={fdb.db.name}"
