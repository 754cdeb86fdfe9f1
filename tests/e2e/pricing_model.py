"""pricing_model: an independent Python model of billing-worker's pricing.

Written from the contract (PRODUCT.md sections 3, 4 G1, 5 and 6), not from the C
code, so that the e2e tests can compute expected amounts for traffic-sized cases
without trusting the worker. Exact: decimal.Decimal only, every division checked
to be exact (Inexact is trapped), no binary floating point anywhere.

    import pricing_model as pm
    p = pm.Pricing({"version": "v1", "credit_usd": "0.002", "minimum_credits": 1,
                    "models": [{"match": "*", "credits_per_call": 1}],
                    "tools": [{"match": "*", "credits_per_call": 2}]})
    cfg_text = p.libconfig()                  # the `pricing = {...};` group
    charge = p.price(pm.dedup(events))        # events of one request
    charge.amount_credits, charge.amount_micro, charge.cost_usd, charge.lines

What it models:
  * usage normalisation (section 3) for the three shapes, in the contract's
    detection order: OpenAI Chat (prompt_tokens / completion_tokens present),
    OpenAI Responses (input_tokens_details / output_tokens_details present),
    native/Anthropic otherwise; -> input (uncached), cache_read, cache_write,
    output (reasoning included), reasoning;
  * rules (section 6): first glob match wins; model call = credits_per_call +
    usd / credit_usd with usd = (input*in + cache_read*cr + cache_write*cw +
    (output-reasoning)*out + reasoning*re) / 10^6, cr/cw default to in, re to
    out; a call without usage whose rule has token prices but no
    credits_per_call is priced with the "*" rule (basis flat_fallback); tool call
    = units * (credits_per_call + usd_per_call / credit_usd); failed calls cost 0
    when bill_failed_calls is false (still counted);
  * the charge: exact sum of the lines, rounded once to `precision` decimals in
    `rounding` mode, raised to minimum_credits after rounding; amount_micro;
    cost_usd = amount * credit_usd, 6 decimals half up;
  * dedup (G1): the key is idempotency_key, else event_id; the first wins.

CloudEvents envelopes are unwrapped by dedup()/group_requests().
Not modelled: the LiteLLM price map, timing (finalize / late
events: adjustments are priced with `price(..., adjustment=True)`).
"""

import fnmatch
from decimal import (ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Context,
                     Decimal, Inexact, Rounded)

# Plenty of digits for token counts up to 2^40 times 12-significant-digit
# prices; Inexact/Rounded trapped: any result that is not exact raises.
_CTX = Context(prec=200, traps=[Inexact, Rounded])
_QCTX = Context(prec=200)  # for the one deliberate rounding (quantize)

ROUNDING = {"half_up": ROUND_HALF_UP, "half_even": ROUND_HALF_EVEN,
            "ceil": ROUND_CEILING, "floor": ROUND_FLOOR}

MODEL_FIELDS = ("credits_per_call", "input_usd_per_mtok", "output_usd_per_mtok",
                "cache_read_usd_per_mtok", "cache_write_usd_per_mtok",
                "reasoning_usd_per_mtok")
TOKEN_PRICE_FIELDS = MODEL_FIELDS[1:]
TOOL_FIELDS = ("credits_per_call", "usd_per_call")
MILLION = Decimal(1000000)


class Malformed(ValueError):
    """An event the contract calls malformed (its usage cannot be normalised)."""


def D(x):
    """An exact Decimal from a str/int/Decimal (never from a float)."""
    if isinstance(x, float):
        raise TypeError("pricing_model takes prices as strings, ints or Decimals, not %r" % x)
    return Decimal(x) if not isinstance(x, Decimal) else x


def fmt_plain(d):
    """A Decimal as plain text without exponent or trailing zeros ("3", "0.0375")."""
    d = D(d)
    if d == d.to_integral_value():
        return str(int(d))
    s = format(d, "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


# ---- usage normalisation (section 3) ------------------------------------------------------
def _count(obj, name):
    v = obj.get(name, 0) if isinstance(obj, dict) else 0
    if v is None:
        v = 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2 ** 40:
        raise Malformed("%s: %r is not a token count" % (name, v))
    return v


def normalise_usage(usage):
    """A `usage` object -> dict input/cache_read/cache_write/output/reasoning.

    `input` is the uncached input; `output` includes `reasoning`."""
    z = {"input": 0, "cache_read": 0, "cache_write": 0, "output": 0, "reasoning": 0}
    if usage is None:
        return z
    if not isinstance(usage, dict):
        raise Malformed("usage is not an object")
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # 1. OpenAI Chat
        prompt = _count(usage, "prompt_tokens")
        cached = _count(usage.get("prompt_tokens_details") or {}, "cached_tokens")
        cw = _count(usage, "cache_creation_input_tokens")
        out = _count(usage, "completion_tokens")
        reasoning = _count(usage.get("completion_tokens_details") or {}, "reasoning_tokens")
        if cached + cw > prompt:
            raise Malformed("cached + cache writes > prompt_tokens")
        if reasoning > out:
            raise Malformed("reasoning > completion_tokens")
        return {"input": prompt - cached - cw, "cache_read": cached, "cache_write": cw,
                "output": out, "reasoning": reasoning}
    if "input_tokens_details" in usage or "output_tokens_details" in usage:  # 2. Responses
        inp = _count(usage, "input_tokens")
        cached = _count(usage.get("input_tokens_details") or {}, "cached_tokens")
        out = _count(usage, "output_tokens")
        reasoning = _count(usage.get("output_tokens_details") or {}, "reasoning_tokens")
        if cached > inp:
            raise Malformed("cached > input_tokens")
        if reasoning > out:
            raise Malformed("reasoning > output_tokens")
        return {"input": inp - cached, "cache_read": cached, "cache_write": 0,
                "output": out, "reasoning": reasoning}
    known = ("input_tokens", "output_tokens", "cache_read_input_tokens",
             "cache_creation_input_tokens", "reasoning_tokens")
    if not any(k in usage for k in known):  # 3. native
        raise Malformed("usage has none of the known fields")
    out = _count(usage, "output_tokens")
    reasoning = _count(usage, "reasoning_tokens")
    if reasoning > out:
        raise Malformed("reasoning > output_tokens")
    return {"input": _count(usage, "input_tokens"),
            "cache_read": _count(usage, "cache_read_input_tokens"),
            "cache_write": _count(usage, "cache_creation_input_tokens"),
            "output": out, "reasoning": reasoning}


# ---- CloudEvents 1.0 structured JSON (section 3) ----------------------------------------------
def unwrap(ev):
    """A CloudEvents envelope -> the plain event (id is the event_id, the last
    dot-separated segment of type is the type, the rest is read from data);
    a plain event is returned as is."""
    if not isinstance(ev, dict) or "specversion" not in ev:
        return ev
    out = dict(ev.get("data") or {})
    out["event_id"] = ev["id"]
    out["type"] = ev["type"].rsplit(".", 1)[-1]
    return out


# ---- dedup (G1) ------------------------------------------------------------------------------
def dedup_key(ev):
    return ev.get("idempotency_key") or ev["event_id"]


def dedup(events):
    """The distinct events of a list (one request, or many: the key is scoped
    to request_id), in order of first appearance; the first of a key wins."""
    seen, out = set(), []
    for ev in map(unwrap, events):
        k = (ev.get("request_id"), dedup_key(ev))
        if k in seen:
            continue
        seen.add(k)
        out.append(ev)
    return out


def group_requests(events):
    """Distinct events grouped by request_id, in order of first appearance:
    [(request_id, [events])]."""
    order, groups = [], {}
    for ev in dedup(events):
        rid = ev["request_id"]
        if rid not in groups:
            groups[rid] = []
            order.append(rid)
        groups[rid].append(ev)
    return [(rid, groups[rid]) for rid in order]


# ---- pricing (section 6) ----------------------------------------------------------------------
class Line:
    def __init__(self, kind, name):
        self.kind, self.name = kind, name
        self.calls = 0
        self.units = 0
        self.credits = Decimal(0)
        self.tokens = {"input": 0, "cache_read": 0, "cache_write": 0, "output": 0,
                       "reasoning": 0}
        self.bases = set()

    def __repr__(self):
        return "Line(%s %s calls=%d units=%d credits=%s)" % (
            self.kind, self.name, self.calls, self.units, fmt_plain(self.credits))


class Charge:
    """What the contract says a set of calls costs (the fields of section 5)."""

    def __init__(self):
        self.lines = {}  # (kind, name) -> Line, in order of first call
        self.model_calls = 0
        self.tool_calls = 0
        self.tokens = {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0,
                       "reasoning": 0}
        self.total = Decimal(0)  # exact, unrounded
        self.amount = None  # rounded, minimum applied (a Decimal with `precision` places)
        self.minimum_applied = False
        self.amount_credits = self.cost_usd = None
        self.amount_micro = None

    def line(self, kind, name):
        return self.lines.get((kind, name))

    def __repr__(self):
        return "Charge(%s credits, %d model calls, %d tool calls, lines=%r)" % (
            self.amount_credits, self.model_calls, self.tool_calls, list(self.lines.values()))


class Pricing:
    def __init__(self, spec):
        """spec: a dict of the `pricing` group; numbers as str/int/Decimal;
        `models` and `tools` lists of rule dicts (each with `match`)."""
        self.spec = spec
        self.version = spec.get("version", "")
        self.credit_usd = D(spec["credit_usd"])
        self.minimum = D(spec.get("minimum_credits", 0))
        self.precision = int(spec.get("precision", 4))
        self.rounding = spec.get("rounding", "half_up")
        self.bill_failed = spec.get("bill_failed_calls", True)
        self.models = list(spec["models"])
        self.tools = list(spec["tools"])
        for rules in (self.models, self.tools):
            if not rules or rules[-1]["match"] != "*":
                raise ValueError("models and tools must end with a '*' rule")
        if spec.get("litellm_prices"):
            raise NotImplementedError("pricing_model does not model litellm_prices")

    # -- the config text --
    def libconfig(self, **override):
        """The `pricing = {...};` group for this spec (override: keys replaced,
        None removes one). Numbers are written exactly as given."""
        spec = dict(self.spec)
        for k, v in override.items():
            if v is None:
                spec.pop(k, None)
            else:
                spec[k] = v
        out = ["pricing = {"]
        for k, v in spec.items():
            if k in ("models", "tools"):
                rules = []
                for r in v:
                    rules.append("{ " + " ".join("%s = %s;" % (rk, _lc(rv))
                                                 for rk, rv in r.items()) + " }")
                out.append("  %s = (\n    %s\n  );" % (k, ",\n    ".join(rules)))
            else:
                out.append("  %s = %s;" % (k, _lc(v)))
        out.append("};")
        return "\n".join(out) + "\n"

    # -- rules --
    @staticmethod
    def _match(rules, name):
        for r in rules:
            if fnmatch.fnmatchcase(name, r["match"]):
                return r
        raise AssertionError("unreachable: the last rule is '*'")

    def _usd_to_credits(self, usd):
        return _CTX.divide(usd, self.credit_usd)

    def model_call_credits(self, ev):
        """(credits, normalised tokens, basis) of one model call."""
        tok = normalise_usage(ev.get("usage"))
        rule = self._match(self.models, ev["model"])
        has_token_prices = any(f in rule for f in TOKEN_PRICE_FIELDS)
        basis = "per_call" if not has_token_prices else "tokens"
        if ev.get("usage") is None and has_token_prices and "credits_per_call" not in rule:
            rule = self.models[-1]
            basis = "flat_fallback"
        if ev.get("status") == "error" and not self.bill_failed:
            return Decimal(0), tok, basis
        inp = D(rule.get("input_usd_per_mtok", 0))
        out = D(rule.get("output_usd_per_mtok", 0))
        cr = D(rule.get("cache_read_usd_per_mtok", inp))
        cw = D(rule.get("cache_write_usd_per_mtok", inp))
        re = D(rule.get("reasoning_usd_per_mtok", out))
        c = _CTX
        usd_mtok = c.add(c.add(c.add(c.multiply(tok["input"], inp),
                                     c.multiply(tok["cache_read"], cr)),
                               c.add(c.multiply(tok["cache_write"], cw),
                                     c.multiply(tok["output"] - tok["reasoning"], out))),
                         c.multiply(tok["reasoning"], re))
        usd = c.divide(usd_mtok, MILLION)
        credits = c.add(D(rule.get("credits_per_call", 0)), self._usd_to_credits(usd))
        return credits, tok, basis

    def tool_call_credits(self, ev):
        """(credits, units) of one tool call."""
        units = ev.get("units", 1)
        if isinstance(units, bool) or not isinstance(units, int) or not 1 <= units <= 10 ** 6:
            raise Malformed("units %r" % (units,))
        rule = self._match(self.tools, ev["tool_name"])
        if ev.get("status") == "error" and not self.bill_failed:
            return Decimal(0), units
        per = _CTX.add(D(rule.get("credits_per_call", 0)),
                       self._usd_to_credits(D(rule.get("usd_per_call", 0))))
        return _CTX.multiply(units, per), units

    # -- a request --
    def price(self, events, adjustment=False):
        """The charge for a request's DISTINCT events (finalize markers and other
        types are ignored). adjustment=True: never raised to the minimum (G5)."""
        ch = Charge()
        for ev in events:
            t = ev.get("type")
            if t == "custom_model_call":
                credits, tok, basis = self.model_call_credits(ev)
                ln = ch.lines.setdefault(("model", ev["model"]), Line("model", ev["model"]))
                ln.calls += 1
                ln.credits = _CTX.add(ln.credits, credits)
                ln.bases.add(basis)
                for k, v in tok.items():
                    ln.tokens[k] += v
                    ch.tokens[k] += v
                ch.model_calls += 1
            elif t == "custom_tool_call":
                credits, units = self.tool_call_credits(ev)
                ln = ch.lines.setdefault(("tool", ev["tool_name"]),
                                         Line("tool", ev["tool_name"]))
                ln.calls += 1
                ln.units += units
                ln.credits = _CTX.add(ln.credits, credits)
                ch.tool_calls += 1
            else:
                continue
            ch.total = _CTX.add(ch.total, credits)
        q = Decimal(1).scaleb(-self.precision)
        amount = ch.total.quantize(q, rounding=ROUNDING[self.rounding], context=_QCTX)
        if not adjustment and amount < self.minimum:
            amount = self.minimum.quantize(q, rounding=ROUND_HALF_UP, context=_QCTX)
            ch.minimum_applied = True
        ch.amount = amount
        ch.amount_credits = format(amount, "f")
        ch.amount_micro = int(_CTX.multiply(amount, MILLION))
        ch.cost_usd = format(_CTX.multiply(amount, self.credit_usd)
                             .quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP,
                                       context=_QCTX), "f")
        return ch


def _lc(v):
    """A libconfig literal for a pricing value, written exactly."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Decimal):
        s = format(v, "f")
        return s if "." in s else s + ".0"
    if isinstance(v, str):
        try:  # numeric strings are numbers, written as given
            Decimal(v)
            if v.strip() and v.strip()[0] in "0123456789-+.":
                return v
        except ArithmeticError:
            pass
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError("cannot write %r" % (v,))


# ---- a realistic token-based pricing for the e2e tests --------------------------------------------
def example_spec(version="e2e-tokens-1", **override):
    """A token-priced `pricing` spec for current models (USD per million tokens),
    USD-priced tools with units, a credits-per-call fallback; override: keys
    replaced (None removes one)."""
    spec = {
        "version": version,
        "credit_usd": "0.002",
        "minimum_credits": "1.0",
        "precision": 4,
        "rounding": "half_up",
        "bill_failed_calls": True,
        "models": [
            {"match": "gpt-4o-mini*", "input_usd_per_mtok": "0.15",
             "output_usd_per_mtok": "0.60", "cache_read_usd_per_mtok": "0.075"},
            {"match": "gpt-4o*", "input_usd_per_mtok": "2.5", "output_usd_per_mtok": "10",
             "cache_read_usd_per_mtok": "1.25", "cache_write_usd_per_mtok": "3.125"},
            {"match": "o3-mini*", "input_usd_per_mtok": "1.1", "output_usd_per_mtok": "4.4",
             "cache_read_usd_per_mtok": "0.55", "reasoning_usd_per_mtok": "4.4"},
            {"match": "claude-sonnet-4*", "input_usd_per_mtok": "3",
             "output_usd_per_mtok": "15", "cache_read_usd_per_mtok": "0.30",
             "cache_write_usd_per_mtok": "3.75", "credits_per_call": "0.5"},
            {"match": "*", "credits_per_call": "1.0"},
        ],
        "tools": [
            {"match": "web_search", "credits_per_call": "1", "usd_per_call": "0.01"},
            {"match": "code_*", "usd_per_call": "0.0035"},
            {"match": "*", "credits_per_call": "2.0"},
        ],
    }
    for k, v in override.items():
        if v is None:
            spec.pop(k, None)
        else:
            spec[k] = v
    return spec


# ---- self-test: hand-computed cases (python3 pricing_model.py) ------------------------------------
def _selftest():
    legacy = Pricing({"version": "legacy", "credit_usd": "0.002", "minimum_credits": "1.0",
                      "precision": 4, "rounding": "half_up",
                      "models": [{"match": "*", "credits_per_call": "1.0"}],
                      "tools": [{"match": "*", "credits_per_call": "2.0"}]})
    ex = [{"type": "custom_model_call", "event_id": "e1", "request_id": "r1", "model": "gpt-4o"},
          {"type": "custom_tool_call", "event_id": "e2", "request_id": "r1",
           "tool_name": "web_search"},
          {"type": "custom_model_call", "event_id": "e3", "request_id": "r1", "model": "gpt-4o"},
          {"type": "custom_model_call", "event_id": "e4", "request_id": "r1", "model": "gpt-4o"},
          {"type": "custom_model_call", "event_id": "e4", "request_id": "r1", "model": "gpt-4o"},
          {"type": "request_finalize", "event_id": "e5", "request_id": "r1"}]
    ch = legacy.price(dedup(ex))
    # 3 model calls * 1 + 1 tool call * 2 = 5; 5 * 0.002 = 0.010000 USD
    assert (ch.amount_credits, ch.amount_micro, ch.cost_usd) == ("5.0000", 5000000, "0.010000"), ch
    assert fmt_plain(ch.line("model", "gpt-4o").credits) == "3"
    assert fmt_plain(ch.line("tool", "web_search").credits) == "2"
    assert legacy.price([]).amount_credits == "1.0000" and legacy.price([]).minimum_applied

    tok = Pricing({"credit_usd": "0.002", "minimum_credits": 0, "precision": 4,
                   "models": [{"match": "gpt-4o-mini*", "input_usd_per_mtok": "0.15",
                               "output_usd_per_mtok": "0.60",
                               "cache_read_usd_per_mtok": "0.075"},
                              {"match": "*", "credits_per_call": 1}],
                   "tools": [{"match": "web_search", "credits_per_call": 2,
                              "usd_per_call": "0.005"},
                             {"match": "*", "credits_per_call": 2}]})
    # Chat: prompt 1000 incl. 400 cached, completion 200:
    # usd = (600*0.15 + 400*0.075 + 200*0.60)/1e6 = (90+30+120)/1e6 = 0.00024
    # credits = 0.00024/0.002 = 0.12
    c, t, _ = tok.model_call_credits({"model": "gpt-4o-mini", "usage": {
        "prompt_tokens": 1000, "completion_tokens": 200,
        "prompt_tokens_details": {"cached_tokens": 400}}})
    assert c == Decimal("0.12") and t["input"] == 600 and t["cache_read"] == 400, (c, t)
    # Responses: input 1000 incl. 400 cached, output 200 incl. 50 reasoning: same 0.12
    # (reasoning defaults to the output price)
    c, t, _ = tok.model_call_credits({"model": "gpt-4o-mini", "usage": {
        "input_tokens": 1000, "output_tokens": 200,
        "input_tokens_details": {"cached_tokens": 400},
        "output_tokens_details": {"reasoning_tokens": 50}}})
    assert c == Decimal("0.12") and t["reasoning"] == 50, (c, t)
    # Native: input 600 (uncached), cache read 400, cache write 100 (input price),
    # output 200: (90 + 30 + 100*0.15=15 + 120)/1e6 = 0.000255 -> 0.1275 credits
    c, t, _ = tok.model_call_credits({"model": "gpt-4o-mini", "usage": {
        "input_tokens": 600, "cache_read_input_tokens": 400,
        "cache_creation_input_tokens": 100, "output_tokens": 200}})
    assert c == Decimal("0.1275"), c
    # tool: 3 units * (2 + 0.005/0.002 = 2.5) = 13.5
    c, u = tok.tool_call_credits({"tool_name": "web_search", "units": 3})
    assert c == Decimal("13.5") and u == 3, c
    # rounding: 0.00005 at precision 4: half_up 0.0001, half_even 0.0000, ceil 0.0001,
    # floor 0.0000. A model call of 1/3 token at... use 0.1 USD/Mtok output, 1 token:
    # 0.1/1e6 = 1e-7 USD = 0.00005 credits.
    for mode, want in (("half_up", "0.0001"), ("half_even", "0.0000"), ("ceil", "0.0001"),
                       ("floor", "0.0000")):
        p = Pricing({"credit_usd": "0.002", "rounding": mode, "precision": 4,
                     "models": [{"match": "*", "output_usd_per_mtok": "0.1"}],
                     "tools": [{"match": "*", "credits_per_call": 2}]})
        got = p.price([{"type": "custom_model_call", "model": "m",
                        "usage": {"output_tokens": 1}}]).amount_credits
        assert got == want, (mode, got)
    # Chat with cache writes: prompt 1000 = 500 uncached + 300 cached + 200 written
    t = normalise_usage({"prompt_tokens": 1000, "cache_creation_input_tokens": 200,
                         "prompt_tokens_details": {"cached_tokens": 300},
                         "completion_tokens": 10})
    assert (t["input"], t["cache_read"], t["cache_write"]) == (500, 300, 200), t
    print("pricing_model self-test ok")


if __name__ == "__main__":
    _selftest()
