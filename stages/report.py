"""DVC stage report: every evaluated model in one table, one plot and one chart."""

from spinflow.report import report
from spinflow.runner import run_stage

if __name__ == "__main__":
    run_stage("report", report)
