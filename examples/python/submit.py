#!/usr/bin/env python3
"""Submit one task to a fedmesh node and print its result.

    pip install "paho-mqtt>=2,<3"
    python3 submit.py "echo this back" --input "hello fedmesh"
    python3 submit.py "translate into German" --input "thank you" --username alice --password "$PW"

Prints status lines to stderr and the output to stdout; exits 0 when the task completed.
"""

import argparse
import base64
import json
import os
import sys
import threading
import uuid

import paho.mqtt.client as mqtt


def parse_args():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("description", help="what to do, in plain language (used for routing)")
    p.add_argument("--input", default="", help="the task's input text")
    p.add_argument("--skill", action="append", default=[], help="required skill (repeatable)")
    p.add_argument("--request-id", default=None, help="idempotency key (default: random)")
    p.add_argument("--deadline-ms", type=int, default=30000, help="relative deadline")
    p.add_argument("--host", default=env("FEDMESH_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("FEDMESH_PORT", "1883")))
    p.add_argument("--username", default=env("FEDMESH_USERNAME"))
    p.add_argument("--password", default=env("FEDMESH_PASSWORD"))
    p.add_argument("--name", default=env("FEDMESH_NAME", "requester"),
                   help="principal of an anonymous requester (ignored when --username is given)")
    return p.parse_args()


def main():
    args = parse_args()
    principal = args.username or args.name
    base = f"fedmesh/v1/client/{principal}"
    request_id = args.request_id or f"py-{uuid.uuid4().hex[:16]}"
    request = {
        "request_id": request_id,
        "description": args.description,
        "input": args.input,
        "skills": args.skill,
        "deadline_ms": args.deadline_ms,
    }
    done = threading.Event()
    final = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            final.update(state="refused", error=f"connect refused: {reason_code}")
            done.set()
            return
        # Replies go to our inbox: subscribe first, submit once the subscription is confirmed.
        client.subscribe(f"{base}/inbox", qos=1)

    def on_subscribe(client, userdata, mid, reason_code_list, properties):
        if reason_code_list[0].is_failure:
            final.update(state="refused", error="inbox subscription refused")
            done.set()
            return
        # After a reconnect this repeats the submit: same request_id, so the same task.
        client.publish(f"{base}/submit", json.dumps(request), qos=1)

    def on_message(client, userdata, msg):
        m = json.loads(msg.payload)
        if m.get("request_id") != request_id:
            return  # a reply to some other request of ours
        kind = m.get("type")
        if kind in ("accepted", "status", "progress"):
            detail = m.get("agent") or m.get("note") or ""
            if kind == "progress":
                detail = f"{m.get('percent')}% {m.get('note', '')}"
            print(f"{kind}: {m.get('state')} {detail}", file=sys.stderr)
        if kind in ("result", "error"):
            final.update(m)
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=principal)
    if args.username:
        client.username_pw_set(args.username, args.password)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    finished = done.wait(timeout=args.deadline_ms / 1000 + 5)
    client.disconnect()
    client.loop_stop()

    if not finished:
        print(f"no result for request {request_id} in time", file=sys.stderr)
        return 1
    if final.get("type") == "error":
        print(f"refused: {final.get('field')}: {final.get('reason')}", file=sys.stderr)
        return 1
    if final.get("state") != "completed":
        print(f"task {final.get('task_id')} {final.get('state')}: {final.get('error')}", file=sys.stderr)
        return 1
    if "output_b64" in final:
        sys.stdout.buffer.write(base64.b64decode(final["output_b64"]))
    else:
        print(final.get("output", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
