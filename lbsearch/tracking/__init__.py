"""MLflow tracking of a search (:class:`Tracker`: one parent run per study, one nested run per
trial, written by the search driver only), the names it logs under, and the front as HTML."""
from .front_html import front_html, rows_of
from .names import UI_HINT, check_server, flatten, plan_params, result_metrics, storage_tag, ui_command
from .tracker import QUEUE_FILE, Tracker

__all__ = ["QUEUE_FILE", "Tracker", "UI_HINT", "check_server", "flatten", "front_html", "plan_params",
           "result_metrics", "rows_of", "storage_tag", "ui_command"]
