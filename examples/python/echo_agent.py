#!/usr/bin/env python3
"""A minimal fedmesh agent: echoes each task's input back (optionally uppercased).

    pip install "paho-mqtt>=2,<3"
    python3 echo_agent.py --name echo                 # anonymous, node on 127.0.0.1:1883
    python3 echo_agent.py --username echo --password "$PW" --upper "Shouts its input back"

Follows docs/agent-api.md: Last Will on .../withdraw, subscribe to the exact inbox topic,
advertise, answer every `task` with a progress update and a result, withdraw on ctrl-c.
"""

import argparse
import base64
import json
import os
import signal
import sys
import time

import paho.mqtt.client as mqtt

TTL_S = 3600  # lifetime of our advertisement; we re-advertise every third of it


def parse_args():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("description", nargs="?", default="Echoes its input back",
                   help="what this agent does, in plain language (used for routing)")
    p.add_argument("--host", default=env("FEDMESH_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("FEDMESH_PORT", "1883")))
    p.add_argument("--username", default=env("FEDMESH_USERNAME"), help="from `fedmesh agent add NAME`")
    p.add_argument("--password", default=env("FEDMESH_PASSWORD"))
    p.add_argument("--name", default=env("FEDMESH_NAME", "echo"),
                   help="principal of an anonymous agent (ignored when --username is given)")
    p.add_argument("--upper", action="store_true", help="uppercase the echoed text")
    return p.parse_args()


def main():
    args = parse_args()
    principal = args.username or args.name  # the node knows us by our username, else client id
    base = f"fedmesh/v1/agent/{principal}"

    advert = {
        "description": args.description,
        "examples": ["echo this text back to me"],
        "skills": ["echo"],
        "resources": {"capacity": 4},
        "ttl_s": TTL_S,
    }

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(f"connect refused: {reason_code}", file=sys.stderr)
            return
        # Subscribe to our inbox (exact topic), then advertise. Done on every (re)connect.
        client.subscribe(f"{base}/inbox", qos=1)
        client.publish(f"{base}/advertise", json.dumps(advert), qos=1)

    def on_message(client, userdata, msg):
        m = json.loads(msg.payload)
        kind = m.get("type")
        if kind == "task":
            task_id = m["task_id"]
            # Text input arrives as "input"; binary input as "input_b64".
            if "input_b64" in m:
                data = base64.b64decode(m["input_b64"])
            else:
                data = m.get("input", "").encode()
            print(f"task {task_id} (attempt {m.get('attempt')}): {len(data)} bytes", file=sys.stderr)
            client.publish(f"{base}/progress",
                           json.dumps({"task_id": task_id, "percent": 50, "note": "echoing"}), qos=1)
            try:
                text = data.decode()
                result = {"task_id": task_id, "output": text.upper() if args.upper else text}
            except UnicodeDecodeError:
                result = {"task_id": task_id, "output_b64": base64.b64encode(data).decode()}
            # On failure we would send {"task_id": ..., "error": "why"}; the node retries elsewhere.
            client.publish(f"{base}/result", json.dumps(result), qos=1)
        elif kind == "advertised":
            print(f"advertised as {m['agent']} (version {m['version']})", file=sys.stderr)
        elif kind == "error":
            print(f"node refused {m.get('op')}: {m.get('field')}: {m.get('reason')}", file=sys.stderr)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=principal)
    if args.username:
        client.username_pw_set(args.username, args.password)
    # If we vanish without saying goodbye, the broker withdraws us.
    client.will_set(f"{base}/withdraw", "{}", qos=1)
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()  # network in a background thread; reconnects automatically

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)   # ctrl-c
    signal.signal(signal.SIGTERM, stop)  # kill, docker stop, systemd
    try:
        while True:
            time.sleep(TTL_S / 3)
            client.publish(f"{base}/advertise", json.dumps(advert), qos=1)
    except KeyboardInterrupt:
        print("withdrawing", file=sys.stderr)
        client.publish(f"{base}/withdraw", "{}", qos=1).wait_for_publish(timeout=3)
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    main()
