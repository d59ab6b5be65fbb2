"""Audits of deployed models: results stored one at a time in SQLite, resumable after any kill."""

from .run import Plan, Summary, audit
from .store import AuditStore, Row

__all__ = ["AuditStore", "Plan", "Row", "Summary", "audit"]
