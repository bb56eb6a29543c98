"""DVC stage report: every iteration in one table, one plot and one chart."""

from spinflow.cli import run_stage
from spinflow.steps import report

if __name__ == "__main__":
    run_stage("report", report)
