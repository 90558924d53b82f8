"""The `spot-supervisor poison` verbs: arguments here, the work in supervisor/ops/poison.py
(imported only when a poison command runs, so the other commands load no queue client; it never
imports this module)."""

from __future__ import annotations

import argparse
import sys

from supervisor.cli_failure import report_failure
from worker.settings import MAX_MESSAGES_PER_CALL, QueueSettings


def add_arguments(poison: argparse.ArgumentParser) -> None:
    verbs = poison.add_subparsers(dest="poison_command", required=True)
    listing = verbs.add_parser("list", help="the messages in <queue>-poison, oldest first, and why they are there")
    listing.add_argument("--config")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--limit", type=_limit, default=MAX_MESSAGES_PER_CALL,
                         help=f"at most this many (1-{MAX_MESSAGES_PER_CALL}, the default)")
    again = verbs.add_parser("requeue", help="put messages back on the main queue as fresh messages, original text unchanged")
    again.add_argument("--config")
    again.add_argument("--all", action="store_true", help="every message in the poison queue")
    again.add_argument("ids", nargs="*", metavar="ID", help="poison-queue message ids (from `poison list`)")
    purge_parser = verbs.add_parser("purge", help="delete every message in <queue>-poison")
    purge_parser.add_argument("--config")
    purge_parser.add_argument("--yes", action="store_true", help="yes, delete them all")


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_MESSAGES_PER_CALL:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_MESSAGES_PER_CALL} (the most the queue service peeks at), "
                                         f"got {text!r}")
    return value


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) before any settings are read."""
    if args.poison_command == "requeue" and args.all == bool(args.ids):
        parser.error("poison requeue: give either --all or message ids, not both and not neither")
    if args.poison_command == "purge" and not args.yes:
        parser.error("poison purge deletes every message in the poison queue: add --yes to do it")


def run(args: argparse.Namespace, settings: QueueSettings) -> int:
    """Exit code of a `poison` command; one line on stderr for what went wrong."""
    from azure.core.exceptions import AzureError

    from supervisor.ops.poison import PoisonError

    try:
        return _run(args, settings)
    except (PoisonError, AzureError) as exc:
        return report_failure("poison", exc)


def _run(args: argparse.Namespace, settings: QueueSettings) -> int:
    from supervisor.ops.poison import format_list, list_json, list_poisoned, purge, requeue

    if args.poison_command == "list":
        messages, total = list_poisoned(settings, args.limit)
        print(list_json(settings.poison_name, messages, total) if args.json else format_list(settings.poison_name, messages, total))
        return 0
    if args.poison_command == "purge":
        count = purge(settings)
        said = "every message" if count is None else f"{count} message(s)" if count == 0 else f"about {count} message(s)"
        print(f"purged {said} from {settings.poison_name}")
        return 0
    result = requeue(settings, None if args.all else args.ids)
    print(f"requeued {len(result.requeued)} message(s) from {settings.poison_name} to {settings.name}")
    if result.failed:
        print(f"poison requeue: {len(result.failed)} could not be moved (still in {settings.poison_name}): "
              f"{', '.join(result.failed)}", file=sys.stderr)
    if result.not_found:
        print(f"poison requeue: not in {settings.poison_name}: {', '.join(result.not_found)}", file=sys.stderr)
    return 1 if result.failed or result.not_found else 0
