"""Versioned layout of the teacher-signal cache (filled by the extraction stage)."""
