"""The jobs: everything that walks folders, joins process groups and writes outputs.

``run`` holds one function per job of ``cli.py`` (``evaluate``, ``fit``, ``predict``, ``export``, ``demo``), each
taking one settings object and returning one result object; the other modules are the steps they are made of
(``evaluate_category``, ``fit_folder`` / ``predict_paths``, ``export_detector``, ``cross_fit``, heatmaps, the HTML
report, the allocator setting). Nothing else in the package imports this layer.
"""

from . import run
from .run import (DemoSettings, EvaluateSettings, EvaluationResult, ExportSettings, ExportSummary, FitSettings,
                  PredictionResult, PredictSettings)
from .predict import FitResult

__all__ = ["DemoSettings", "EvaluateSettings", "EvaluationResult", "ExportSettings", "ExportSummary", "FitResult",
           "FitSettings", "PredictSettings", "PredictionResult", "run"]
