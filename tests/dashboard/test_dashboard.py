"""The dashboard in headless Chromium against a live secured cluster (started by
scripts/dashboard-test.sh, which passes everything through DASHBOARD_* variables).

What a user relies on: the page asks for a token and refuses a wrong one; a submitted
job shows up and reaches RUNNING and then FINISHED on the page without a reload; the
job page shows its graph and every task with attempt, TaskManager and slot; the filter
narrows the list; Cancel on the page cancels the job (dispatchctl sees CANCELED); a read
token's Cancel is refused with a message and changes nothing; the TaskManagers and
cluster pages show slots and replicas. Every wait has a deadline. Screenshots of each
page go to DASHBOARD_SHOTS.
"""

import json
import os
import re
import subprocess
import sys
import uuid

from playwright.sync_api import expect, sync_playwright

URL = os.environ["DASHBOARD_URL"]
FOLLOWER_URL = os.environ["DASHBOARD_FOLLOWER_URL"]
ADMIN = os.environ["DASHBOARD_ADMIN_TOKEN"].strip()
READ = os.environ["DASHBOARD_READ_TOKEN"].strip()
CTL = [os.environ["DASHBOARD_CTL"]] + os.environ["DASHBOARD_CTL_ARGS"].split()
WORK = os.environ["DASHBOARD_WORK"]
SHOTS = os.environ["DASHBOARD_SHOTS"]
CHROMIUM = os.environ["DASHBOARD_CHROMIUM"]

WAIT_MS = 30_000


def ctl(*args):
    out = subprocess.run(CTL + list(args), capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"dispatchctl {' '.join(args)}: {out.stderr}")
    return out.stdout.strip()


def submit(name, spec):
    path = os.path.join(WORK, f"{name}.toml")
    with open(path, "w") as f:
        f.write(spec)
    job_id = str(uuid.uuid4())
    ctl("job", "submit", "--id", job_id, path)
    return job_id, job_id.replace("-", "")


def job_state(job_id):
    return json.loads(ctl("-o", "json", "job", "status", job_id))["state"]


def shot(page, name):
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)
    print(f"  screenshot {name}")


def sign_in(page, token):
    page.fill("#token", token)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin")).to_be_hidden(timeout=WAIT_MS)


def main():
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # The cluster's development CA is not in Chromium's store; the test checks the
        # page, not the certificate (the Rust tests check HTTPS with the CA).
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1360, "height": 900})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text and "403" not in m.text else None)
        page.on("dialog", lambda d: d.accept())

        print("sign-in")
        page.goto(URL + "/")
        expect(page.locator("#signin")).to_be_visible(timeout=WAIT_MS)
        page.fill("#token", "not-a-token-of-this-cluster-0123456789abcdef")
        page.click("#signin-form button[type=submit]")
        expect(page.locator("#signin-error")).to_contain_text("does not know", timeout=WAIT_MS)
        shot(page, "01-sign-in.png")
        sign_in(page, ADMIN)
        expect(page.locator("h1")).to_have_text("Jobs", timeout=WAIT_MS)

        print("a job reaches RUNNING and FINISHED on the page")
        short_id, short_jid = submit(
            "nightly-etl",
            'name = "nightly-etl"\n\n[[vertices]]\nname = "extract"\nparallelism = 2\n'
            'task = { sleep = { duration_ms = 6000 } }\n\n[[vertices]]\nname = "transform"\n'
            'parallelism = 2\ntask = { sleep = { duration_ms = 6000 } }\n\n[[vertices]]\n'
            'name = "load"\nparallelism = 1\ntask = { sleep = { duration_ms = 6000 } }\n\n'
            '[[edges]]\nfrom = "extract"\nto = "transform"\n\n[[edges]]\nfrom = "transform"\nto = "load"\n',
        )
        long_id, long_jid = submit(
            "clickstream",
            'name = "clickstream"\n\n[[vertices]]\nname = "source"\nparallelism = 2\n'
            'task = { sleep = { duration_ms = 600000 } }\n\n[[vertices]]\nname = "sessionize"\n'
            'parallelism = 1\ntask = { sleep = { duration_ms = 600000 } }\n\n[[edges]]\n'
            'from = "source"\nto = "sessionize"\n',
        )
        row = page.locator(f'tr[data-jid="{short_jid}"]')
        expect(row).to_contain_text("nightly-etl", timeout=WAIT_MS)
        expect(row).to_contain_text("RUNNING", timeout=WAIT_MS)
        expect(page.locator(f'tr[data-jid="{long_jid}"]')).to_contain_text("RUNNING", timeout=WAIT_MS)
        shot(page, "02-jobs-running.png")
        row.click()
        expect(page.locator("h1")).to_contain_text("nightly-etl", timeout=WAIT_MS)
        expect(page.locator("svg.dag g.node")).to_have_count(3, timeout=WAIT_MS)
        tasks = page.locator("#tasks-table tbody tr")
        expect(tasks).to_have_count(5, timeout=WAIT_MS)
        first = page.locator('#tasks-table tr[data-vertex="extract"][data-subtask="0"]')
        expect(first).to_contain_text(re.compile("tm-[12]"), timeout=WAIT_MS)
        shot(page, "03-job-running.png")
        expect(page.locator("h1 .pill")).to_have_text("FINISHED", timeout=WAIT_MS)
        expect(page.locator("#cancel-job")).to_be_disabled()
        shot(page, "04-job-finished.png")
        assert job_state(short_id) == "FINISHED"

        print("the filter narrows the list")
        page.goto(URL + "/#/jobs")
        expect(page.locator(f'tr[data-jid="{short_jid}"]')).to_contain_text("FINISHED", timeout=WAIT_MS)
        page.select_option("#filter-state", "FINISHED")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(1, timeout=WAIT_MS)
        page.select_option("#filter-state", "")
        page.fill("#filter-name", "click")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(1, timeout=WAIT_MS)
        expect(page.locator("#jobs-table tbody tr")).to_contain_text("clickstream")
        page.fill("#filter-name", "")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(2, timeout=WAIT_MS)

        print("TaskManagers and cluster pages")
        page.goto(URL + "/#/taskmanagers")
        expect(page.locator(".card.tm")).to_have_count(2, timeout=WAIT_MS)
        expect(page.locator(".slot.used")).to_have_count(3, timeout=WAIT_MS)
        shot(page, "05-taskmanagers.png")
        page.goto(FOLLOWER_URL + "/#/cluster")
        # Another replica: the token is per tab and origin, so sign in there too.
        sign_in(page, ADMIN)
        expect(page.locator("#replicas-table tbody tr")).to_have_count(3, timeout=WAIT_MS)
        expect(page.locator("#replicas-table .health.ok")).to_have_count(3, timeout=WAIT_MS)
        expect(page.locator("#replicas-table tr.leader")).to_have_count(1, timeout=WAIT_MS)
        shot(page, "06-cluster.png")

        print("a read token's cancel is refused and changes nothing")
        page.goto(URL + f"/#/jobs/{long_jid}")
        page.click("#signout")
        sign_in(page, READ)
        expect(page.locator("h1")).to_contain_text("clickstream", timeout=WAIT_MS)
        page.click("#cancel-job")
        expect(page.locator("#notice")).to_contain_text("may not cancel", timeout=WAIT_MS)
        shot(page, "07-read-token-cancel-refused.png")
        assert job_state(long_id) == "RUNNING", "a refused cancel changed the job"

        print("cancel from the page")
        page.click("#signout")
        sign_in(page, ADMIN)
        expect(page.locator("h1 .pill")).to_have_text("RUNNING", timeout=WAIT_MS)
        page.click("#cancel-job")
        expect(page.locator("h1 .pill")).to_have_text("CANCELED", timeout=WAIT_MS)
        shot(page, "08-job-cancelled.png")
        assert job_state(long_id) == "CANCELED"

        page.goto(URL + "/#/jobs")
        expect(page.locator(f'tr[data-jid="{long_jid}"]')).to_contain_text("CANCELED", timeout=WAIT_MS)
        shot(page, "09-jobs-ended.png")

        browser.close()
        if errors:
            raise AssertionError("errors in the page: " + "; ".join(errors))
    print("dashboard test passed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - the harness reports any failure the same way
        print(f"dashboard test FAILED: {e}", file=sys.stderr)
        sys.exit(1)
