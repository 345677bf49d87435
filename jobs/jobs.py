"""Ray jobs on a cluster: list, status, logs (--follow to reattach), stop.

Each action prints one JSON line; `logs ID --follow` streams the job's logs to stderr and ends like
a submission does (the job's result lines, or a status line, on stdout; the job's exit status).
"""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(submittable=False)  # its --address is the cluster to ask, not one to run on
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every job of the cluster with its status")
    status = actions.add_parser("status", help="one job's status, times, exit code and message")
    status.add_argument("job_id")
    logs = actions.add_parser("logs", help="one job's logs (--follow: until it ends, with its exit status)")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    for action in (listing, status, logs, stop):
        action.add_argument(
            "--address",
            default=None,
            help="the cluster's dashboard, http(s)://HEAD:8265 (default: RAY_ADDRESS, else http://127.0.0.1:8265)",
        )


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from jobs.remote import attach, connect, dashboard_address, describe

    address = dashboard_address(args.address)
    client = connect(address)
    if args.action == "list":
        emit({"jobs": [describe(job) for job in client.list_jobs()]})
    elif args.action == "status":
        emit(describe(client.get_job_info(args.job_id)))
    elif args.action == "logs" and args.follow:
        return attach(client, args.job_id, address)
    elif args.action == "logs":
        emit({"job_id": args.job_id, "logs": client.get_job_logs(args.job_id)})
    elif args.action == "stop":
        stopped = client.stop_job(args.job_id)  # False: it had already ended
        emit({"job_id": args.job_id, "stopped": stopped, "status": client.get_job_status(args.job_id).value})
    return 0
