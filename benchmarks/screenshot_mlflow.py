"""Screenshots of the MLflow UI on a run folder's store, for the README (headless Debian Chromium).

    mlflow ui --backend-store-uri sqlite:///$PWD/runs/smollm2-135m/mlflow.db --port 5055 &
    python benchmarks/screenshot_mlflow.py --url http://127.0.0.1:5055 --out docs/images

Needs `pip install playwright` and Debian's chromium (/usr/bin/chromium); no browser download.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mlflow import MlflowClient
from playwright.sync_api import sync_playwright


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:5055")
    ap.add_argument("--experiment", default="lbsearch")
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    exp = MlflowClient(args.url).get_experiment_by_name(args.experiment).experiment_id
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.goto(f"{args.url}/#/experiments/{exp}/runs")
        page.wait_for_selector("text=lbsearch-", timeout=60_000)
        for close in page.get_by_label("Close").all():  # the assistant side panel
            if close.is_visible():
                close.click()
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # expand the trials
        page.wait_for_selector("text=trial 0", timeout=30_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "mlflow-runs.png"))
        browser.close()
    print(f"wrote {out / 'mlflow-runs.png'}")


if __name__ == "__main__":
    main()
