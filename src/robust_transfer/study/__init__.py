"""Studies: the paper's experiment grid as one resumable command, with its tables and plots."""

from .api import STORE_NAME, plan_study, resolve_store, run_study, store_path_for
from .outcomes import PictureOutcome, SourceOutcome, TransferOutcome, load_outcomes, load_pictures
from .plan import Run, plan_runs
from .spec import StudySpec, load_spec, parse_spec
from .status import StudyStatus, format_status, study_status
from .store import Store

__all__ = [
    "STORE_NAME", "PictureOutcome", "Run", "SourceOutcome", "Store", "StudySpec", "StudyStatus", "TransferOutcome",
    "format_status", "load_outcomes", "load_pictures", "load_spec", "parse_spec", "plan_runs", "plan_study",
    "resolve_store", "run_study", "store_path_for", "study_status",
]
