#!/usr/bin/env python3
"""Checks of deploy/ that need no Docker engine, cluster or systemd PID 1.

Called by tests/ops/check_deploy.sh, which installs the tools and builds the
metrics list; run that script, not this one. Prints one line per check:

    ok   - NAME
    FAIL - NAME: why
    skip - NAME: why

and exits 0. Arguments:
    --root DIR        the repository
    --bin FILE        the billing-worker binary (check-config)
    --metrics FILE    metric names the renderer exposes, one per line
    --tmp DIR         scratch directory
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

try:
    import yaml
except ImportError:  # check_deploy.sh installs python3-yaml; this is the fallback
    yaml = None

RESULTS = []


def report(status, name, why=""):
    RESULTS.append(status)
    line = "%-4s - %s" % (status, name)
    if why:
        line += ": " + why
    print(line, flush=True)


def check(name, fn):
    """Run fn(); None or True = ok, a string = FAIL with that reason, ("skip", why) = skip."""
    try:
        r = fn()
    except Exception as e:  # a check that crashes is a failed check
        report("FAIL", name, "%s: %s" % (type(e).__name__, e))
        return
    if r is None or r is True:
        report("ok", name)
    elif isinstance(r, tuple) and r[0] == "skip":
        report("skip", name, r[1])
    else:
        report("FAIL", name, str(r))


DUR_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
DUR_MS = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}


def duration_ms(text):
    m = DUR_RE.match(text.strip())
    if not m:
        raise ValueError("not a duration: %r" % text)
    return int(m.group(1)) * DUR_MS[m.group(2)]


def cfg_value(cfg_text, key):
    """The first scalar named @key (bare name, any group) of a libconfig text, or None."""
    text = re.sub(r'("(?:[^"\\]|\\.)*")|#[^\n]*|//[^\n]*', lambda m: m.group(1) or "", cfg_text)
    m = re.search(r'\b%s\s*=\s*(?:"([^"]*)"|([^;\s]+))\s*;' % re.escape(key), text)
    if not m:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def metric_names(expr):
    return set(re.findall(r"\bbilling_worker_[a-zA-Z0-9_]+", expr))


class Checks:
    def __init__(self, args):
        self.root = os.path.abspath(args.root)
        self.bin = args.bin
        self.tmp = args.tmp
        with open(args.metrics) as f:
            self.metrics = {l.strip() for l in f if l.strip()}
        self.docs = {}  # path -> list of YAML documents
        self.promtool = shutil.which("promtool")

    def p(self, *parts):
        return os.path.join(self.root, *parts)

    # ---- YAML ---------------------------------------------------------------
    def yaml_files(self):
        files = sorted(glob.glob(self.p("deploy", "**", "*.yaml"), recursive=True) +
                       glob.glob(self.p("deploy", "**", "*.yml"), recursive=True) +
                       glob.glob(self.p("tests", "ops", "*.yaml")))
        return files

    def parse_yaml(self, path):
        with open(path) as f:
            text = f.read()
        if yaml is not None:
            self.docs[path] = [d for d in yaml.safe_load_all(text) if d is not None]
            return None
        # Minimal check without PyYAML: no tabs in indentation, balanced brackets.
        for n, line in enumerate(text.splitlines(), 1):
            if re.match(r"^\t", line):
                return "line %d: tab in indentation" % n
        if text.count("[") != text.count("]") or text.count("{") != text.count("}"):
            return "unbalanced brackets"
        return ("skip", "PyYAML unavailable: only a minimal syntax check passed")

    def rel(self, path):
        return os.path.relpath(path, self.root)

    # ---- configuration files --------------------------------------------------
    def check_config(self, path):
        if not self.bin or not os.access(self.bin, os.X_OK):
            return "no billing-worker binary at %s (build it first)" % self.bin
        r = subprocess.run([self.bin, "check-config", "-c", path], capture_output=True, text=True,
                           timeout=60, env={k: v for k, v in os.environ.items()
                                            if not k.startswith("BW_")})
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0:
            return "exit %d: %s" % (r.returncode, out)
        if ": ok" not in r.stdout:
            return "no 'ok' from check-config (stub binary?): %r" % out
        return None

    def configmap_cfg(self):
        for d in self.docs.get(self.p("deploy", "k8s", "configmap.yaml"), []):
            if d.get("kind") == "ConfigMap":
                return d["data"]["billing-worker.cfg"]
        raise KeyError("no ConfigMap with billing-worker.cfg in deploy/k8s/configmap.yaml")

    # ---- Kubernetes -------------------------------------------------------------
    def k8s_objects(self):
        objs = {}
        for path in sorted(glob.glob(self.p("deploy", "k8s", "*.yaml"))):
            for d in self.docs.get(path, []):
                if d.get("kind") == "Kustomization":
                    continue
                objs[(d["kind"], d["metadata"]["name"])] = d
        return objs

    def k8s_basic(self):
        bad = []
        for path in sorted(glob.glob(self.p("deploy", "k8s", "*.yaml"))):
            for d in self.docs.get(path, []):
                if d.get("kind") == "Kustomization":
                    for r in d.get("resources", []):
                        if not os.path.exists(os.path.join(os.path.dirname(path), r)):
                            bad.append("kustomization lists missing %s" % r)
                    continue
                for k in ("apiVersion", "kind", "metadata"):
                    if k not in d:
                        bad.append("%s: a document without %s" % (self.rel(path), k))
                if not d.get("metadata", {}).get("name"):
                    bad.append("%s: %s without metadata.name" % (self.rel(path), d.get("kind")))
        listed = set()
        for d in self.docs.get(self.p("deploy", "k8s", "kustomization.yaml"), []):
            listed |= set(d.get("resources", []))
        for path in glob.glob(self.p("deploy", "k8s", "*.yaml")):
            b = os.path.basename(path)
            # secret.yaml holds placeholders: applying it would overwrite real Secrets
            if b not in ("kustomization.yaml", "secret.yaml") and b not in listed:
                bad.append("%s not listed in kustomization.yaml" % b)
        return "; ".join(bad) or None

    def k8s_deployment(self):
        objs = self.k8s_objects()
        dep = objs[("Deployment", "billing-worker")]
        cfg = self.configmap_cfg()
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        bad = []
        if spec.get("replicas") != 3:
            bad.append("replicas %r, expected 3" % spec.get("replicas"))
        sel = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            bad.append("selector does not match the pod labels")
        c = pod["containers"][0]
        port = int(cfg_value(cfg, "listen").rsplit(":", 1)[1])
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ports.get("metrics") != port:
            bad.append("container port metrics=%r, http.listen port %d" % (ports.get("metrics"), port))
        if not cfg_value(cfg, "listen").startswith("0.0.0.0:"):
            bad.append("http.listen must be 0.0.0.0:PORT in a pod (probes come from the node)")
        if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            bad.append("readinessProbe is not GET /readyz")
        if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
            bad.append("livenessProbe is not GET /healthz")
        stop_ms = duration_ms(cfg_value(cfg, "shutdown_timeout") or "10s")
        for e in c.get("env", []):
            if e.get("name") == "BW_SHUTDOWN_TIMEOUT" and "value" in e:
                stop_ms = duration_ms(e["value"])
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if tgps * 1000 <= stop_ms:
            bad.append("terminationGracePeriodSeconds %d not above shutdown_timeout %d ms"
                       % (tgps, stop_ms))
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
            bad.append("runAsNonRoot not set")
        if (csc.get("runAsUser") or psc.get("runAsUser") or 0) == 0:
            bad.append("no non-zero runAsUser")
        if csc.get("readOnlyRootFilesystem") is not True:
            bad.append("readOnlyRootFilesystem not true")
        if csc.get("allowPrivilegeEscalation") is not False:
            bad.append("allowPrivilegeEscalation not false")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []):
            bad.append("capabilities not dropped")
        res = c.get("resources", {})
        if not res.get("requests") or not res.get("limits", {}).get("memory"):
            bad.append("resources.requests and limits.memory required")
        # volumes reference objects that exist, mounts cover the files the config names
        for v in pod.get("volumes", []):
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in objs:
                bad.append("volume %s: no ConfigMap %s" % (v["name"], v["configMap"]["name"]))
            if "secret" in v and ("Secret", v["secret"]["secretName"]) not in objs:
                bad.append("volume %s: no Secret %s" % (v["name"], v["secret"]["secretName"]))
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                sec = objs.get(("Secret", ref["name"]))
                if not sec or ref["key"] not in {**sec.get("data", {}), **sec.get("stringData", {})}:
                    bad.append("env %s: no key %s in Secret %s" % (e["name"], ref["key"], ref["name"]))
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        files = set()
        for name, path in mounts.items():
            v = vols.get(name, {})
            if "configMap" in v:
                cm = objs.get(("ConfigMap", v["configMap"]["name"]), {})
                files |= {os.path.join(path, k) for k in cm.get("data", {})}
            if "secret" in v:
                sec = objs.get(("Secret", v["secret"]["secretName"]), {})
                items = v["secret"].get("items")
                keys = [i["path"] for i in items] if items else \
                    list({**sec.get("data", {}), **sec.get("stringData", {})})
                files |= {os.path.join(path, k) for k in keys}
        if "/etc/billing-worker/billing-worker.cfg" not in files:
            bad.append("the config is not mounted at /etc/billing-worker/billing-worker.cfg")
        for key in ("jwt_secret_file", "token_file", "ca_file", "cert_file", "key_file"):
            val = cfg_value(cfg, key)
            if val and val not in files:
                bad.append("%s %s is not mounted" % (key, val))
        for prop in re.findall(r'"ssl\.(?:ca|certificate|key)\.location=([^"]+)"', cfg):
            if prop not in files:
                bad.append("kafka property file %s is not mounted" % prop)
        return "; ".join(bad) or None

    def k8s_selectors(self):
        objs = self.k8s_objects()
        labels = objs[("Deployment", "billing-worker")]["spec"]["template"]["metadata"]["labels"]
        bad = []
        for (kind, name), o in objs.items():
            sel = None
            if kind == "Service":
                sel = o["spec"]["selector"]
                tp = [p.get("targetPort") for p in o["spec"]["ports"]]
                if "metrics" not in tp and 9464 not in tp:
                    bad.append("Service %s does not target the metrics port" % name)
            elif kind == "PodDisruptionBudget":
                sel = o["spec"]["selector"]["matchLabels"]
                if "maxUnavailable" not in o["spec"] and "minAvailable" not in o["spec"]:
                    bad.append("PDB without maxUnavailable/minAvailable")
            if sel is not None and any(labels.get(k) != v for k, v in sel.items()):
                bad.append("%s %s selects no billing-worker pod" % (kind, name))
        if not any(k == "Service" for k, _ in objs):
            bad.append("no Service")
        if not any(k == "PodDisruptionBudget" for k, _ in objs):
            bad.append("no PodDisruptionBudget")
        return "; ".join(bad) or None

    def k8s_keda(self):
        objs = self.k8s_objects()
        cfg = self.configmap_cfg()
        so = objs[("ScaledObject", "billing-worker")]
        bad = []
        if so["spec"]["scaleTargetRef"]["name"] != "billing-worker":
            bad.append("scaleTargetRef is not the Deployment")
        trig = [t for t in so["spec"]["triggers"] if t["type"] == "kafka"]
        if not trig:
            return "no kafka trigger"
        md = trig[0]["metadata"]
        if md.get("consumerGroup") != cfg_value(cfg, "group_id"):
            bad.append("consumerGroup %r != kafka.group_id %r" % (md.get("consumerGroup"),
                                                                   cfg_value(cfg, "group_id")))
        if md.get("topic") != cfg_value(cfg, "topic"):
            bad.append("topic %r != kafka.topic %r" % (md.get("topic"), cfg_value(cfg, "topic")))
        if md.get("bootstrapServers") != cfg_value(cfg, "brokers"):
            bad.append("bootstrapServers differ from kafka.brokers")
        if not str(md.get("lagThreshold", "")).isdigit():
            bad.append("lagThreshold missing")
        if so["spec"].get("minReplicaCount", 0) > so["spec"].get("maxReplicaCount", 100):
            bad.append("minReplicaCount above maxReplicaCount")
        ref = trig[0].get("authenticationRef", {}).get("name")
        if ref and ("TriggerAuthentication", ref) not in objs:
            bad.append("no TriggerAuthentication %s" % ref)
        if ref:
            ta = objs[("TriggerAuthentication", ref)]
            for s in ta["spec"].get("secretTargetRef", []):
                sec = objs.get(("Secret", s["name"]), {})
                if s["key"] not in {**sec.get("data", {}), **sec.get("stringData", {})}:
                    bad.append("TriggerAuthentication: no key %s in Secret %s" % (s["key"], s["name"]))
        return "; ".join(bad) or None

    # ---- Docker -----------------------------------------------------------------
    def dockerfile(self):
        path = self.p("deploy", "docker", "Dockerfile")
        with open(path) as f:
            lines = [l.rstrip("\n") for l in f]
        text = "\n".join(lines)
        # join continuation lines
        logical = re.sub(r"\\\n", " ", text).splitlines()
        froms = [l.split()[1] for l in logical if re.match(r"^\s*FROM\s", l, re.I)]
        bad = []
        if len(froms) < 2:
            bad.append("not multi-stage (%d FROM lines)" % len(froms))
        for img in froms:
            if not re.match(r"^debian:12(?:[.\d]*)(?:-slim)?(?:@sha256:[0-9a-f]{64})?$", img):
                bad.append("FROM %s is not a debian:12 image" % img)
        if froms and not froms[-1].startswith("debian:12-slim"):
            bad.append("runtime stage is %s, expected debian:12-slim" % froms[-1])
        last = text[text.rfind("\nFROM "):] if "\nFROM " in text else text
        runtime = re.sub(r"\\\n", " ", last)
        for pkg in ("librdkafka1", "libjansson4", "libcurl4", "libhiredis0.14", "libconfig9",
                    "libssl3", "libmicrohttpd12"):
            if not re.search(r"\b%s\b" % re.escape(pkg), runtime):
                bad.append("runtime stage does not install %s" % pkg)
        if re.search(r"-dev\b", runtime):
            bad.append("runtime stage installs -dev packages")
        user = re.findall(r"(?m)^USER\s+(\S+)", runtime)
        if not user or user[-1].split(":")[0] in ("root", "0"):
            bad.append("runtime stage does not switch to a non-root USER")
        if not re.search(r"(?m)^EXPOSE\s+9464\b", runtime):
            bad.append("no EXPOSE 9464")
        hc = re.search(r"(?m)^HEALTHCHECK\s.*", runtime)
        if not hc or "/healthz" not in hc.group(0) or not re.search(r"\b(curl|wget)\b", hc.group(0)):
            bad.append("no HEALTHCHECK hitting /healthz with curl or wget")
        ep = re.findall(r"(?m)^ENTRYPOINT\s+(.*)$", runtime)
        want = ["billing-worker", "run", "-c", "/etc/billing-worker/billing-worker.cfg"]
        if not ep or json.loads(ep[-1]) != want:
            bad.append("ENTRYPOINT is not %s" % json.dumps(want))
        # every COPY source from the build context exists
        for l in logical:
            m = re.match(r"^\s*COPY\s+(.*)$", l)
            if not m or "--from=" in m.group(1):
                continue
            parts = [x for x in m.group(1).split() if not x.startswith("--")]
            for src in parts[:-1]:
                if not glob.glob(self.p(src.rstrip("/"))):
                    bad.append("COPY source %s not in the repository" % src)
        return "; ".join(bad) or None

    def compose(self):
        path = self.p("deploy", "docker", "compose.yaml")
        d = self.docs[path][0]
        base = os.path.dirname(path)
        svcs = d["services"]
        bad = []
        kafka = [s for s in svcs.values() if str(s.get("image", "")).startswith("apache/kafka")]
        if not kafka or any(s["image"] != "apache/kafka:3.9.1" for s in kafka):
            bad.append("Kafka is not apache/kafka:3.9.1")
        elif "controller" not in str(kafka[0].get("environment", {}).get("KAFKA_PROCESS_ROLES", "")):
            bad.append("Kafka is not a KRaft broker+controller")
        redis = [s for s in svcs.values() if str(s.get("image", "")).startswith("redis")]
        cmd = " ".join(map(str, redis[0].get("command", []))) if redis else ""
        if not re.search(r"--appendonly\s+yes", cmd) or not re.search(r"--appendfsync\s+always", cmd):
            bad.append("Redis without --appendonly yes --appendfsync always")
        workers = {n: s for n, s in svcs.items() if "build" in s}
        if len(workers) != 3:
            bad.append("%d worker services built from the Dockerfile, expected 3" % len(workers))
        for n, s in workers.items():
            b = s["build"]
            ctx = os.path.normpath(os.path.join(base, b.get("context", ".")))
            if not os.path.exists(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))):
                bad.append("%s: Dockerfile not found" % n)
            mounted = [v.split(":") for v in s.get("volumes", []) if isinstance(v, str)]
            if not any(m[1] == "/etc/billing-worker/billing-worker.cfg" for m in mounted if len(m) > 1):
                bad.append("%s: no config mounted at /etc/billing-worker/billing-worker.cfg" % n)
            sg = s.get("stop_grace_period")
            if not sg:
                bad.append("%s: no stop_grace_period" % n)
        ref = [s for s in svcs.values() if s.get("image") == "python:3.11-slim"]
        if not ref or not any("refsvc.py" in " ".join(map(str, s.get("command", []))) for s in ref):
            bad.append("no python:3.11-slim service running refsvc.py")
        for n, s in svcs.items():
            for v in s.get("volumes", []):
                if isinstance(v, str) and v.startswith("."):
                    src = os.path.normpath(os.path.join(base, v.split(":")[0]))
                    if not os.path.exists(src):
                        bad.append("%s: mount source %s missing" % (n, v.split(":")[0]))
            for dep in s.get("depends_on", {}) or {}:
                if dep not in svcs:
                    bad.append("%s depends on unknown %s" % (n, dep))
        for name, sec in (d.get("secrets") or {}).items():
            if "file" in sec and not os.path.exists(os.path.join(base, sec["file"])):
                bad.append("secret %s: %s missing" % (name, sec["file"]))
        for n, s in svcs.items():
            for p in s.get("ports", []):
                if not str(p).startswith("127.0.0.1:"):
                    bad.append("%s publishes %s beyond loopback" % (n, p))
        # the mounted config: timeouts consistent with stop_grace_period
        cfgs = {m[0] for s in workers.values() for m in
                (v.split(":") for v in s.get("volumes", []) if isinstance(v, str))
                if len(m) > 1 and m[1].endswith(".cfg")}
        for c in cfgs:
            with open(os.path.normpath(os.path.join(base, c))) as f:
                text = f.read()
            st = duration_ms(cfg_value(text, "shutdown_timeout") or "10s")
            for n, s in workers.items():
                sg = s.get("stop_grace_period")
                if sg and duration_ms(str(sg)) <= st:
                    bad.append("%s: stop_grace_period %s not above shutdown_timeout" % (n, sg))
            if not (cfg_value(text, "listen") or "").startswith("0.0.0.0:"):
                bad.append("%s: http.listen must be 0.0.0.0:PORT in a container" % c)
        return "; ".join(bad) or None

    # ---- systemd ----------------------------------------------------------------
    def systemd_unit_keys(self):
        path = self.p("deploy", "systemd", "billing-worker.service")
        with open(path) as f:
            text = f.read()
        kv = {}
        for line in text.splitlines():
            m = re.match(r"^([A-Za-z]+)=(.*)$", line)
            if m:
                kv.setdefault(m.group(1), []).append(m.group(2))
        bad = []
        want = {"Type": "simple", "User": "billing-worker", "KillSignal": "SIGTERM",
                "Restart": "on-failure", "ProtectSystem": "strict", "NoNewPrivileges": "yes"}
        for k, v in want.items():
            if kv.get(k, [None])[-1] != v:
                bad.append("%s=%s expected" % (k, v))
        if kv.get("ExecReload", [""])[-1] != "/bin/kill -HUP $MAINPID":
            bad.append("ExecReload is not /bin/kill -HUP $MAINPID")
        if not re.match(r"^\S*billing-worker run -c \S+", kv.get("ExecStart", [""])[-1]):
            bad.append("ExecStart is not billing-worker run -c FILE")
        ts = kv.get("TimeoutStopSec", [None])[-1]
        if not ts or int(re.sub(r"s$", "", ts)) * 1000 <= 10000:
            bad.append("TimeoutStopSec must be above the default shutdown_timeout (10s)")
        return "; ".join(bad) or None

    def systemd_verify(self):
        sa = shutil.which("systemd-analyze")
        if not sa:
            return ("skip", "systemd-analyze not available (install systemd)")
        if not self.bin or not os.access(self.bin, os.X_OK):
            return "no billing-worker binary to stand in for /usr/local/bin/billing-worker"
        src = self.p("deploy", "systemd", "billing-worker.service")
        d = os.path.join(self.tmp, "unit")
        os.makedirs(d, exist_ok=True)
        with open(src) as f:
            text = f.read()
        # verify requires ExecStart's binary to exist: point it at the one just built
        text = text.replace("/usr/local/bin/billing-worker", os.path.abspath(self.bin))
        dst = os.path.join(d, "billing-worker.service")
        with open(dst, "w") as f:
            f.write(text)
        r = subprocess.run([sa, "verify", dst], capture_output=True, text=True, timeout=120)
        out = (r.stdout + r.stderr).strip()
        # verify reports unknown keys and bad values as warnings with exit 0: any output fails
        if r.returncode != 0 or out:
            if re.search(r"(Failed to (connect|create bus)|System has not been booted|"
                         r"Cannot determine cgroup|Failed to initialize manager)", out):
                return ("skip", "systemd-analyze verify cannot run in this container: %s"
                        % out.splitlines()[0])
            return "exit %d: %s" % (r.returncode, out)
        return None

    # ---- monitoring ---------------------------------------------------------------
    def dashboard_exprs(self):
        with open(self.p("deploy", "monitoring", "grafana-dashboard.json")) as f:
            dash = json.load(f)
        exprs, ids = [], []

        def walk(panels):
            for p in panels:
                ids.append(p.get("id"))
                for t in p.get("targets", []):
                    exprs.append((p.get("title"), t.get("expr", "")))
                walk(p.get("panels", []))
        walk(dash.get("panels", []))
        for v in dash.get("templating", {}).get("list", []):
            q = v.get("query")
            if isinstance(q, dict):
                q = q.get("query", "")
            if isinstance(q, str) and "billing_worker_" in q:
                exprs.append(("variable " + v.get("name", ""), q))
        return dash, exprs, ids

    def dashboard_structure(self):
        dash, exprs, ids = self.dashboard_exprs()
        bad = []
        if not dash.get("title") or not dash.get("uid"):
            bad.append("no title/uid")
        if len(ids) != len(set(ids)) or None in ids:
            bad.append("panel ids missing or not unique")
        if not exprs:
            bad.append("no queries")
        for title, e in exprs:
            if not e.strip():
                bad.append("panel %r has an empty query" % title)
        wanted = ["billing_worker_events_consumed_total", "billing_worker_duplicates_total",
                  "billing_worker_dead_letters_total", "billing_worker_settlements_total",
                  "billing_worker_credits_settled_total", "billing_worker_settlement_seconds_bucket",
                  "billing_worker_pending_settlements", "billing_worker_wallet_circuit_open",
                  "billing_worker_pricing_reloads_total", "billing_worker_consumer_lag"]
        used = set().union(*(metric_names(e) for _, e in exprs)) if exprs else set()
        missing = [w for w in wanted if w not in used]
        if missing:
            bad.append("no panel for %s" % ", ".join(missing))
        return "; ".join(bad) or None

    def names_exist(self, exprs):
        unknown = {}
        for where, e in exprs:
            for n in metric_names(e):
                if n not in self.metrics:
                    unknown.setdefault(n, where)
        if unknown:
            return "unknown metric(s): " + ", ".join("%s (in %s)" % kv for kv in sorted(unknown.items()))
        return None

    def dashboard_metrics(self):
        _, exprs, _ = self.dashboard_exprs()
        return self.names_exist(exprs)

    def alert_rules(self):
        doc = self.docs[self.p("deploy", "monitoring", "prometheus-alerts.yaml")][0]
        return [r for g in doc["groups"] for r in g["rules"]]

    def alerts_structure(self):
        bad = []
        names = [r.get("alert") for r in self.alert_rules()]
        for r in self.alert_rules():
            if not r.get("alert") or not r.get("expr"):
                bad.append("a rule without alert/expr")
                continue
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                bad.append("%s: no severity label" % r["alert"])
            if not r.get("annotations", {}).get("summary"):
                bad.append("%s: no summary" % r["alert"])
        text = " ".join(str(r.get("expr")) for r in self.alert_rules())
        for what, pat in (("pending settlements growing", r"billing_worker_pending_settlements"),
                          ("dead letters", r"billing_worker_dead_letters_total"),
                          ("fallback in use", r'via="user_service"'),
                          ("circuit open", r"billing_worker_wallet_circuit_open"),
                          ("consumer lag", r"billing_worker_consumer_lag")):
            if not re.search(pat, text):
                bad.append("no alert on %s" % what)
        if len(names) != len(set(names)):
            bad.append("duplicate alert names")
        return "; ".join(bad) or None

    def alerts_metrics(self):
        return self.names_exist([(r.get("alert"), str(r.get("expr"))) for r in self.alert_rules()])

    def promtool_rules(self):
        if not self.promtool:
            return ("skip", "promtool not installed (Debian package prometheus)")
        r = subprocess.run([self.promtool, "check", "rules",
                            self.p("deploy", "monitoring", "prometheus-alerts.yaml")],
                           capture_output=True, text=True, timeout=120)
        return None if r.returncode == 0 else (r.stdout + r.stderr).strip()

    def promtool_tests(self):
        if not self.promtool:
            return ("skip", "promtool not installed (Debian package prometheus)")
        r = subprocess.run([self.promtool, "test", "rules", self.p("tests", "ops", "alerts-test.yaml")],
                           capture_output=True, text=True, timeout=300)
        return None if r.returncode == 0 else (r.stdout + r.stderr).strip()[-3000:]

    def promtool_dashboard(self):
        """The dashboard's PromQL parses: each query as a recording rule for promtool."""
        if not self.promtool:
            return ("skip", "promtool not installed (Debian package prometheus)")
        _, exprs, _ = self.dashboard_exprs()
        rules = []
        for i, (title, e) in enumerate(exprs):
            if e.startswith("label_values("):
                m = re.match(r"label_values\((.*),\s*\w+\)$", e)
                e = m.group(1) if m else e
            e = (e.replace("$__rate_interval", "5m").replace("$__range", "1h")
                  .replace("$__interval", "1m").replace("$instance", ".*"))
            rules.append({"record": "dashboard:query_%d" % i, "expr": e})
        path = os.path.join(self.tmp, "dashboard-queries.yaml")
        with open(path, "w") as f:
            json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)  # JSON is YAML
        r = subprocess.run([self.promtool, "check", "rules", path], capture_output=True, text=True,
                           timeout=120)
        return None if r.returncode == 0 else (r.stdout + r.stderr).strip()

    def run(self):
        for path in self.yaml_files():
            check("yaml parses: %s" % self.rel(path), lambda path=path: self.parse_yaml(path))
        if yaml is None:
            report("skip", "Kubernetes and compose structure checks", "PyYAML unavailable")
        else:
            check("k8s: every object has apiVersion/kind/name, kustomization complete", self.k8s_basic)
            check("k8s: Deployment (replicas, probes, grace > shutdown_timeout, non-root, "
                  "read-only, mounts)", self.k8s_deployment)
            check("k8s: Service and PodDisruptionBudget select the pods", self.k8s_selectors)
            check("k8s: KEDA ScaledObject matches the consumer group and topic", self.k8s_keda)
            check("compose: KRaft Kafka 3.9.1, Redis AOF always, 3 workers, refsvc, mounts",
                  self.compose)
        check("Dockerfile: debian:12 stages, runtime libs, non-root, EXPOSE, HEALTHCHECK, "
              "ENTRYPOINT", self.dockerfile)
        check("systemd unit: required settings", self.systemd_unit_keys)
        check("systemd-analyze verify deploy/systemd/billing-worker.service", self.systemd_verify)
        for cfg in sorted(glob.glob(self.p("deploy", "**", "*.cfg"), recursive=True)):
            check("check-config %s" % self.rel(cfg), lambda cfg=cfg: self.check_config(cfg))
        if yaml is not None:
            def cm():
                path = os.path.join(self.tmp, "configmap-billing-worker.cfg")
                with open(path, "w") as f:
                    f.write(self.configmap_cfg())
                return self.check_config(path)
            check("check-config deploy/k8s/configmap.yaml (billing-worker.cfg)", cm)
        check("dashboard JSON parses, has panels for every metric", self.dashboard_structure)
        check("dashboard queries name metrics the renderer exposes", self.dashboard_metrics)
        check("dashboard queries parse (promtool)", self.promtool_dashboard)
        if yaml is not None:
            check("alert rules cover pending/dead letters/fallback/circuit/lag", self.alerts_structure)
            check("alert rules name metrics the renderer exposes", self.alerts_metrics)
        check("promtool check rules deploy/monitoring/prometheus-alerts.yaml", self.promtool_rules)
        check("promtool test rules tests/ops/alerts-test.yaml", self.promtool_tests)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--tmp", required=True)
    Checks(ap.parse_args()).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
