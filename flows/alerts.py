"""Failure alerts: a Prefect automation that posts to a webhook when any dubflow flow run fails or crashes.

    python -m flows.alerts --webhook https://hooks.example/dub   # against $PREFECT_API_URL

The webhook gets JSON {"text": "<subject>\\n<body>"} (Slack-compatible). Re-running replaces
the block and the automation of the same name, so the URL can be changed at any time;
`scripts/deploy.sh` runs this when DUBFLOW_ALERT_WEBHOOK is set.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

AUTOMATION = "dubflow-run-failed"
BLOCK = "dubflow-alerts"
SUBJECT = "dubflow: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = "{{ flow_run.state.message }}\nParameters: {{ flow_run.parameters }}"


def configure_failure_webhook(url: str) -> str:
    """Save the webhook block and (re)create the automation; returns the automation's id."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_id = CustomWebhookNotificationBlock(
        name=BLOCK, url=url, method="POST", json_data={"text": "{{subject}}\n{{body}}"}
    ).save(BLOCK, overwrite=True)
    _delete_existing(Automation)
    automation = Automation(
        name=AUTOMATION,
        description="A dubflow flow run failed or crashed",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return str(automation.id)


def _delete_existing(automation_cls) -> None:
    with contextlib.suppress(ValueError):  # none of that name yet
        automation_cls.read(name=AUTOMATION).delete()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.alerts", description=__doc__.splitlines()[0])
    parser.add_argument("--webhook", required=True, help="URL that receives a POST per failed run")
    args = parser.parse_args(argv)
    try:
        automation = configure_failure_webhook(args.webhook)
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        print(f"dubflow: cannot set up the failure webhook: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"failed or crashed flow runs now post to {args.webhook} (automation {automation})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
