"""Alembic revisions, applied in order by :mod:`b24sms.schema` (``b24sms db upgrade``).

Each revision is a snapshot: it writes out its columns, indexes and SQL conditions and imports
nothing from :mod:`b24sms.models`, so that it keeps meaning what it meant when it was written.
``duplicates`` pairs their column lists and headers with each other: that repetition is
deliberate, and a helper shared between revisions would let an old revision change under a new
one.
"""
