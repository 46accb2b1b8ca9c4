"""The report stage: per-layer and per-type allocation a person can inspect (Markdown, HTML, CSV, figures)."""

from .frames import allocation_frame
from .render import write_reports

__all__ = ["allocation_frame", "write_reports"]
