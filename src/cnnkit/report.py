"""The run report lives in `cnnkit.engine.report`; these names stay importable from here."""

from cnnkit.engine.report import default_report_path, write_report  # noqa: F401
