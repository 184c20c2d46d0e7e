"""Which database errors pass and which refuse the data.

A write either failed *now* (the server unreachable, shutting down, stepping down, busy, out of
quota, or an error nobody listed) and is retried as it is, with backoff and the records kept in
memory; or the server refused *the document itself* (a validator, its size, its field names),
which no retry fixes, and the document goes to quarantine. Only the second is listed
(``REFUSAL_CODES``): an unknown server error is retried rather than taken as the document's
fault, so a passing fault never sends a good frame to quarantine.
"""
from __future__ import annotations

DUPLICATE_KEY = 11000

# Server codes that refuse a document for what it is: BadValue, FailedToParse, TypeMismatch,
# InvalidBSON, DollarPrefixedFieldName, InvalidIdField, InvalidDBRef, EmptyFieldName,
# DottedFieldName, ImmutableField, DocumentValidationFailure, BSONObjectTooLarge, KeyTooLong,
# and the insert's own "document too large".
REFUSAL_CODES = frozenset({2, 9, 14, 22, 52, 53, 55, 56, 57, 66, 121, 10334, 17280, 17419})


def is_refusal_code(code) -> bool:
    return code in REFUSAL_CODES


def is_transient(exc: BaseException) -> bool:
    """True for a database error worth retrying as it is: the connection failed, or the server
    answered with any error that does not refuse the document (``REFUSAL_CODES``). False for a
    refusal, a document the driver cannot encode, and errors that are not the database's."""
    from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure

    if isinstance(exc, ConnectionFailure):  # AutoReconnect, NotPrimary, NetworkTimeout, ServerSelectionTimeout...
        return True
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        if details.get("writeConcernErrors"):
            return True
        codes = [e.get("code") for e in details.get("writeErrors", []) if e.get("code") != DUPLICATE_KEY]
        return any(not is_refusal_code(code) for code in codes)
    if isinstance(exc, OperationFailure):  # WriteError, WriteConcernError, command errors
        return not is_refusal_code(exc.code)
    return False
