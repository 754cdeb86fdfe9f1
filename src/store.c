/*
 * store.c - request state in Redis (see bw_store.h for the key layout).
 *
 * Lua numbers are doubles: counts are kept with HINCRBY and token counts
 * only ever travel as strings, so nothing large is computed in Lua.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>
#include <openssl/evp.h>

#include "bw_log.h"
#include "bw_store.h"
#include "bw_util.h"

#define KEY_MAX (BW_ENC_ID_MAX + 48)
#define NOW_MS_LUA                                                                                 \
    "local t = redis.call('TIME')\n"                                                               \
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

/* clang-format off */
/*
 * APPLY. KEYS[1] = due; per event i: KEYS[2i] = meta, KEYS[2i+1] = events.
 * ARGV[1] = request_timeout_ms, ARGV[2] = finalize_grace_ms; per event 8 args:
 * request_id, dedup key, kind (M/T/F), compact payload, user, session, org,
 * expected ("" or "<model_calls>:<tool_calls>").
 * Events hash values are "<gen>|<compact>". Returns one integer per event
 * (bw_apply_result). Each request's meta hash is read once per call (HMGET)
 * and written once at the end: per event, only the dedup entry (HSETNX) is
 * a command of its own.
 */
static const char *lua_apply = NOW_MS_LUA
    "local rto = tonumber(ARGV[1])\n"
    "local grace = tonumber(ARGV[2])\n"
    "local n = (#KEYS - 1) / 2\n"
    "local out = {}\n"
    "local reqs, order = {}, {}\n"
    "for i = 1, n do\n"
    "  local m = KEYS[2 * i]\n"
    "  local e = KEYS[2 * i + 1]\n"
    "  local b = 2 + (i - 1) * 8\n"
    "  local rid, dkey, kind, compact = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]\n"
    "  local user, sess, org, exp = ARGV[b + 5], ARGV[b + 6], ARGV[b + 7], ARGV[b + 8]\n"
    "  local r = reqs[m]\n"
    "  if not r then\n"
    "    local v = redis.call('HMGET', m, 'user', 'gen', 'cu', 'fin', 'xm', 'xt', 'nm', 'nt')\n"
    "    r = {rid = rid, user = v[1], gen = tonumber(v[2] or '0'), cu = tonumber(v[3] or '0'),\n"
    "         fin = v[4] and tonumber(v[4]), xm = v[5] and tonumber(v[5]),\n"
    "         xt = v[6] and tonumber(v[6]), nm = tonumber(v[7] or '0'),\n"
    "         nt = tonumber(v[8] or '0'), dnm = 0, dnt = 0, late = 0}\n"
    "    reqs[m] = r\n"
    "    order[#order + 1] = m\n"
    "  end\n"
    "  if r.user and r.user ~= user then\n"
    "    out[i] = 3\n"
    "  elseif redis.call('HSETNX', e, dkey, r.gen .. '|' .. compact) == 0 then\n"
    "    local old = redis.call('HGET', e, dkey)\n"
    "    local sep = string.find(old, '|', 1, true)\n"
    "    if string.sub(old, sep + 1) == compact then out[i] = 1 else out[i] = 2 end\n"
    "  else\n"
    "    if not r.user then\n"
    "      r.user = user\n"
    "      r.create = {sess, org}\n"
    "    end\n"
    "    r.touched = true\n"
    "    local due = nil\n"
    "    if r.gen == 0 then\n"
    "      out[i] = 0\n"
    "      if kind == 'M' then r.nm = r.nm + 1; r.dnm = r.dnm + 1\n"
    "      elseif kind == 'T' then r.nt = r.nt + 1; r.dnt = r.dnt + 1\n"
    "      elseif not r.fin then\n"
    "        r.fin = now\n"
    "        r.setfin = true\n"
    "        if exp ~= '' then\n"
    "          local c = string.find(exp, ':', 1, true)\n"
    "          r.xm = tonumber(string.sub(exp, 1, c - 1))\n"
    "          r.xt = tonumber(string.sub(exp, c + 1))\n"
    "        end\n"
    "      end\n"
    "      if not r.fin then due = now + rto\n"
    "      elseif not r.xm then due = now\n"
    "      elseif r.nm >= r.xm and r.nt >= r.xt then due = now\n"
    "      elseif kind == 'F' then due = r.fin + grace\n"
    "      end\n"
    "    else\n"
    "      out[i] = 4\n"
    "      if kind ~= 'F' then\n"
    "        r.late = r.late + 1\n"
    "        due = now + grace\n"
    "      end\n"
    "    end\n"
    "    if due then\n"
    "      if due < r.cu then due = r.cu end\n"
    "      r.due = due\n"
    "    end\n"
    "  end\n"
    "end\n"
    "for _, m in ipairs(order) do\n"
    "  local r = reqs[m]\n"
    "  if r.touched then\n"
    "    if r.create then\n"
    "      redis.call('HSET', m, 'user', r.user, 'sess', r.create[1], 'org', r.create[2],\n"
    "                 'gen', 0, 'done', 0, 'first', now)\n"
    "    end\n"
    "    if r.setfin and r.xm then\n"
    "      redis.call('HSET', m, 'last', now, 'fin', r.fin, 'xm', r.xm, 'xt', r.xt)\n"
    "    elseif r.setfin then\n"
    "      redis.call('HSET', m, 'last', now, 'fin', r.fin)\n"
    "    else\n"
    "      redis.call('HSET', m, 'last', now)\n"
    "    end\n"
    "    if r.dnm > 0 then redis.call('HINCRBY', m, 'nm', r.dnm) end\n"
    "    if r.dnt > 0 then redis.call('HINCRBY', m, 'nt', r.dnt) end\n"
    "    if r.late > 0 then redis.call('HINCRBY', m, 'late' .. r.gen, r.late) end\n"
    "    if r.due and r.gen == 0 then\n"
    "      redis.call('ZADD', KEYS[1], r.due, r.rid)\n"
    "    elseif r.due then\n"
    "      redis.call('ZADD', KEYS[1], 'LT', r.due, r.rid)\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return out\n";

/* CLAIM. KEYS[1] = due. ARGV[1] = lease_ms, ARGV[2] = max. */
static const char *lua_claim = NOW_MS_LUA
    "local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))\n"
    "for _, id in ipairs(ids) do\n"
    "  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)\n"
    "end\n"
    "return ids\n";

/*
 * LOAD. KEYS = meta, events, settlements, due. ARGV[1] = request id,
 * ARGV[2] = lease_ms. Closes the open generation if it is the one to settle.
 * Returns {0} (nothing to do) or {1, gen, user, sess, org, finalize, intent,
 * wallet_only, attempts, compact...}.
 */
static const char *lua_load = NOW_MS_LUA
    "local m, e, s, due = KEYS[1], KEYS[2], KEYS[3], KEYS[4]\n"
    "if redis.call('EXISTS', m) == 0 then\n"
    "  redis.call('ZREM', due, ARGV[1])\n"
    "  return {0}\n"
    "end\n"
    "local done = tonumber(redis.call('HGET', m, 'done'))\n"
    "local gen = tonumber(redis.call('HGET', m, 'gen'))\n"
    "if gen == done then\n"
    "  if done > 0 and tonumber(redis.call('HGET', m, 'late' .. done) or '0') == 0 then\n"
    "    redis.call('ZREM', due, ARGV[1])\n"
    "    return {0}\n"
    "  end\n"
    "  local reason = 'timeout'\n"
    "  if redis.call('HEXISTS', m, 'fin') == 1 then\n"
    "    local xm = redis.call('HGET', m, 'xm')\n"
    "    if not xm then\n"
    "      reason = 'marker'\n"
    "    elseif tonumber(redis.call('HGET', m, 'nm') or '0') >= tonumber(xm) and\n"
    "           tonumber(redis.call('HGET', m, 'nt') or '0') >= tonumber(redis.call('HGET', m, "
    "'xt')) then\n"
    "      reason = 'expected_met'\n"
    "    else\n"
    "      reason = 'incomplete'\n"
    "    end\n"
    "  end\n"
    "  if done > 0 then reason = redis.call('HGET', s, '0:f') or reason end\n"
    "  redis.call('HSET', m, 'gen', done + 1)\n"
    "  redis.call('HSET', s, done .. ':f', reason)\n"
    "end\n"
    "redis.call('HSET', m, 'cu', now + tonumber(ARGV[2]))\n"
    "redis.call('ZADD', due, 'XX', now + tonumber(ARGV[2]), ARGV[1])\n"
    "local wo = redis.call('HGET', s, done .. ':wo') or '0'\n"
    "if redis.call('HEXISTS', s, done .. ':ip') == 1 then wo = '1' end\n"
    "local res = {1, done, redis.call('HGET', m, 'user'), redis.call('HGET', m, 'sess') or '',\n"
    "             redis.call('HGET', m, 'org') or '', redis.call('HGET', s, done .. ':f') or '',\n"
    "             redis.call('HGET', s, done .. ':i') or '', wo,\n"
    "             redis.call('HGET', s, done .. ':a') or '0'}\n"
    "local prefix = done .. '|'\n"
    "local all = redis.call('HGETALL', e)\n"
    "for i = 2, #all, 2 do\n"
    "  local v = all[i]\n"
    "  if string.sub(v, 1, #prefix) == prefix then res[#res + 1] = string.sub(v, #prefix + 1) end\n"
    "end\n"
    "return res\n";

/* INTENT. KEYS[1] = settlements. ARGV = gen, intent. */
static const char *lua_intent = "redis.call('HSETNX', KEYS[1], ARGV[1] .. ':i', ARGV[2])\n"
                                "return redis.call('HGET', KEYS[1], ARGV[1] .. ':i')\n";

/*
 * COMPLETE. KEYS = meta, events, settlements, due, outbox, outbox zset.
 * ARGV = request id, gen, record, retention_ms, grace_ms, outbox field.
 */
static const char *lua_complete = NOW_MS_LUA
    "local m, e, s, due, ob, obz = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]\n"
    "local gen = tonumber(ARGV[2])\n"
    "if tonumber(redis.call('HGET', m, 'done') or '-1') ~= gen then return 0 end\n"
    "redis.call('HDEL', s, gen .. ':i', gen .. ':wo', gen .. ':a', gen .. ':ip', gen .. ':n')\n"
    "redis.call('HSET', m, 'done', gen + 1)\n"
    "redis.call('HDEL', m, 'cu')\n"
    "redis.call('HSET', ob, ARGV[6], ARGV[3])\n"
    "redis.call('ZADD', obz, now, ARGV[6])\n"
    "if tonumber(redis.call('HGET', m, 'late' .. (gen + 1)) or '0') > 0 then\n"
    "  redis.call('ZADD', due, now + tonumber(ARGV[5]), ARGV[1])\n"
    "else\n"
    "  redis.call('ZREM', due, ARGV[1])\n"
    "end\n"
    "for _, k in ipairs({m, e, s}) do redis.call('PEXPIRE', k, tonumber(ARGV[4])) end\n"
    "return 1\n";

/* DEFER. KEYS = meta, settlements, due. ARGV = request id, gen, delay_ms, wallet_only. */
static const char *lua_defer = NOW_MS_LUA
    "if tonumber(redis.call('HGET', KEYS[1], 'done') or '-1') ~= tonumber(ARGV[2]) then\n"
    "  return 0\n"
    "end\n"
    "if ARGV[4] == '1' then redis.call('HSET', KEYS[2], ARGV[2] .. ':wo', '1') end\n"
    "redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':a', 1)\n"
    "redis.call('HDEL', KEYS[2], ARGV[2] .. ':ip')\n"
    "redis.call('HDEL', KEYS[1], 'cu')\n"
    "redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])\n"
    "return 1\n";

/*
 * BEGIN. KEYS = meta, settlements. ARGV = gen. Marks an attempt in progress
 * before any service is called: if its outcome is never recorded (a crash, a
 * stall past the lease, a write Redis lost), the next attempt must treat the
 * wallet's outcome as unknown. Returns 0 if the generation is settled.
 */
static const char *lua_begin =
    "if tonumber(redis.call('HGET', KEYS[1], 'done') or '-1') ~= tonumber(ARGV[1]) then\n"
    "  return 0\n"
    "end\n"
    "redis.call('HSET', KEYS[2], ARGV[1] .. ':ip', '1')\n"
    "return redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':n', 1)\n";

/*
 * FALLBACK_OK. KEYS = settlements, due. ARGV = gen, attempt number, request
 * id, lease_ms. 1 when the attempt is still the latest one and no attempt
 * recorded an unknown outcome; the lease is then renewed, so that no other
 * worker begins an attempt while the fallback call runs.
 */
static const char *lua_fallback_ok = NOW_MS_LUA
    "if redis.call('HGET', KEYS[1], ARGV[1] .. ':n') ~= ARGV[2] then return 0 end\n"
    "if redis.call('HGET', KEYS[1], ARGV[1] .. ':wo') == '1' then return 0 end\n"
    "redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[4]), ARGV[3])\n"
    "return 1\n";

/* OUTBOX_DUE. KEYS = outbox, outbox zset. ARGV = min_age_ms, max. */
static const char *lua_outbox_due = NOW_MS_LUA
    "local f = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0,\n"
    "                     tonumber(ARGV[2]))\n"
    "local res = {}\n"
    "for _, k in ipairs(f) do\n"
    "  local v = redis.call('HGET', KEYS[1], k)\n"
    "  if v then\n"
    "    redis.call('ZADD', KEYS[2], now, k)\n"
    "    res[#res + 1] = k\n"
    "    res[#res + 1] = v\n"
    "  else\n"
    "    redis.call('ZREM', KEYS[2], k)\n"
    "  end\n"
    "end\n"
    "return res\n";

/* clang-format on */

enum {
    S_APPLY,
    S_CLAIM,
    S_LOAD,
    S_INTENT,
    S_COMPLETE,
    S_DEFER,
    S_OUTBOX_DUE,
    S_BEGIN,
    S_FALLBACK_OK,
    S_COUNT
};

static const char **const scripts[S_COUNT] = {&lua_apply,      &lua_claim,    &lua_load,
                                              &lua_intent,     &lua_complete, &lua_defer,
                                              &lua_outbox_due, &lua_begin,    &lua_fallback_ok};

/* One Redis server: the only one, or a cluster master. */
typedef struct rnode {
    char host[256];
    int port;
    redisContext *c;
    int64_t next_connect_ms;
} rnode;

#define N_SLOTS               16384
#define MAX_NODES             64
#define MAX_REDIRECTS         6
#define DEFAULT_BUCKETS       64
#define MAX_BUCKETS           1024
#define BUCKET_TAG_MAX        24
#define CLUSTER_PEEK_AHEAD_MS 2000
#define LAYOUT_RECHECK_MS     10000

struct bw_store {
    int cluster;
    int unix_socket;
    char path[512];
    char password[256];
    int db;
    rnode nodes[MAX_NODES];
    int n_nodes;
    int n_seeds;        /* nodes[0..n_seeds) came from the URL */
    int16_t *slot_node; /* cluster: owner of each slot, -1 unknown */
    int refresh;        /* cluster: reload the slot map before the next command */
    int n_buckets;      /* 1 for a single server */
    char (*btag)[BUCKET_TAG_MAX];
    int *bslot;
    unsigned next_bucket; /* where the next claim starts */
    int layout_ok;        /* cluster: the bucket count matches the stored one */
    int layout_conflict;  /* cluster: it does not */
    int64_t layout_checked_ms;
    char ns[8]; /* key prefix: "bw", or "bws" for a --shadow worker */
    bw_store_timers timers;
    char sha[S_COUNT][41];
};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* CRC16-CCITT (XMODEM), as Redis Cluster computes key slots. */
static uint16_t crc16(const char *buf, size_t len)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)((unsigned char)buf[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

/* The slot of a key: its hash tag's ({...}, non-empty) if it has one. */
static int key_slot(const char *key)
{
    size_t len = strlen(key);
    const char *open = memchr(key, '{', len);
    if (open) {
        const char *close = memchr(open + 1, '}', len - (size_t)(open + 1 - key));
        if (close && close > open + 1)
            return crc16(open + 1, (size_t)(close - open - 1)) & (N_SLOTS - 1);
    }
    return crc16(key, len) & (N_SLOTS - 1);
}

/*
 * Cluster buckets: a request's keys, and the due index and outbox that its
 * scripts touch, must be in one slot. Requests are spread over n_buckets
 * buckets; bucket b's hash tag is the first "b<b>.<k>" whose slot falls in the
 * b-th n_buckets-th of the slot space, so buckets spread evenly over masters
 * that own even slot ranges.
 */
static int init_buckets(bw_store *st)
{
    st->btag = calloc((size_t)st->n_buckets, BUCKET_TAG_MAX);
    st->bslot = calloc((size_t)st->n_buckets, sizeof(int));
    if (!st->btag || !st->bslot)
        return -1;
    for (int b = 0; b < st->n_buckets; b++) {
        int lo = b * N_SLOTS / st->n_buckets, hi = (b + 1) * N_SLOTS / st->n_buckets;
        for (int k = 0;; k++) {
            int n = snprintf(st->btag[b], BUCKET_TAG_MAX, "b%d.%d", b, k);
            int slot = crc16(st->btag[b], (size_t)n) & (N_SLOTS - 1);
            if (slot >= lo && slot < hi) {
                st->bslot[b] = slot;
                break;
            }
        }
    }
    return 0;
}

static int bucket_of(const bw_store *st, const char *enc)
{
    if (st->n_buckets == 1)
        return 0;
    return (int)(crc16(enc, strlen(enc)) % (unsigned)st->n_buckets);
}

static int add_node(bw_store *st, const char *host, size_t hostlen, int port)
{
    for (int i = 0; i < st->n_nodes; i++)
        if (st->nodes[i].port == port && strlen(st->nodes[i].host) == hostlen &&
            memcmp(st->nodes[i].host, host, hostlen) == 0)
            return i;
    if (st->n_nodes == MAX_NODES || hostlen >= sizeof(st->nodes[0].host))
        return -1;
    memcpy(st->nodes[st->n_nodes].host, host, hostlen);
    st->nodes[st->n_nodes].host[hostlen] = '\0';
    st->nodes[st->n_nodes].port = port;
    return st->n_nodes++;
}

/* "host:port" (the last colon separates the port) */
static int add_node_addr(bw_store *st, const char *addr, size_t len)
{
    const char *colon = NULL;
    int port;
    for (size_t i = 0; i < len; i++)
        if (addr[i] == ':')
            colon = addr + i;
    if (!colon || colon == addr)
        return -1;
    port = atoi(colon + 1);
    if (port <= 0 || port > 65535)
        return -1;
    return add_node(st, addr, (size_t)(colon - addr), port);
}

static int parse_url(bw_store *st, const char *url, char *err, size_t errsize)
{
    const char *p;

    if (strncmp(url, "unix://", 7) == 0) {
        const char *q;
        p = url + 7;
        q = strchr(p, '?');
        st->unix_socket = 1;
        snprintf(st->path, sizeof(st->path), "%.*s", (int)(q ? (size_t)(q - p) : strlen(p)), p);
        if (q && strncmp(q, "?db=", 4) == 0)
            st->db = atoi(q + 4);
        if (st->path[0] != '/') {
            bw_seterr(err, errsize, "redis url %s: expected unix:///absolute/path", url);
            return -1;
        }
        st->n_nodes = st->n_seeds = 1;
        return 0;
    }
    if (strncmp(url, "redis+cluster://", 16) == 0) {
        st->cluster = 1;
        p = url + 16;
    } else if (strncmp(url, "redis://", 8) == 0) {
        p = url + 8;
    } else {
        bw_seterr(err, errsize, "redis url %s: expected redis://, redis+cluster:// or unix://",
                  url);
        return -1;
    }
    {
        const char *at = strchr(p, '@');
        if (at) {
            const char *colon = memchr(p, ':', (size_t)(at - p));
            const char *pw = colon ? colon + 1 : p;
            snprintf(st->password, sizeof(st->password), "%.*s", (int)(at - pw), pw);
            p = at + 1;
        }
    }
    if (st->cluster) {
        /* host:port[,host:port...][?buckets=N] */
        const char *q = strchr(p, '?');
        size_t hl = q ? (size_t)(q - p) : strlen(p);
        while (hl > 0) {
            size_t n = strcspn(p, ",?");
            if (n > hl)
                n = hl;
            if (add_node_addr(st, p, n) < 0) {
                bw_seterr(err, errsize, "redis url %s: bad cluster node \"%.*s\" (host:port)", url,
                          (int)n, p);
                return -1;
            }
            p += n;
            hl -= n;
            if (hl > 0 && *p == ',') {
                p++;
                hl--;
            }
        }
        st->n_buckets = DEFAULT_BUCKETS;
        if (q) {
            char *end;
            long b;
            if (strncmp(q, "?buckets=", 9) != 0 || (b = strtol(q + 9, &end, 10)) < 1 ||
                b > MAX_BUCKETS || *end) {
                bw_seterr(err, errsize, "redis url %s: expected ?buckets=1..%d", url, MAX_BUCKETS);
                return -1;
            }
            st->n_buckets = (int)b;
        }
        if (st->n_nodes == 0) {
            bw_seterr(err, errsize, "redis url %s: no cluster node", url);
            return -1;
        }
        st->n_seeds = st->n_nodes;
        return 0;
    }
    {
        size_t hl = strcspn(p, ":/");
        int port = 6379, db = 0;
        const char *h = p;
        p += hl;
        if (*p == ':') {
            port = atoi(p + 1);
            p += 1 + strspn(p + 1, "0123456789");
        }
        if (*p == '/' && p[1])
            db = atoi(p + 1);
        if (hl == 0 || port <= 0 || port > 65535 || add_node(st, h, hl, port) < 0) {
            bw_seterr(err, errsize, "redis url %s: bad host or port", url);
            return -1;
        }
        st->db = db;
        st->n_seeds = 1;
    }
    return 0;
}

bw_store *bw_store_new(const char *url, const bw_store_timers *timers, char *err, size_t errsize)
{
    bw_store *st = calloc(1, sizeof(*st));

    if (!st) {
        bw_seterr(err, errsize, "out of memory");
        return NULL;
    }
    st->n_buckets = 1;
    snprintf(st->ns, sizeof(st->ns), "bw");
    if (parse_url(st, url, err, errsize) < 0) {
        free(st);
        return NULL;
    }
    if (st->cluster) {
        st->slot_node = malloc(N_SLOTS * sizeof(int16_t));
        if (!st->slot_node || init_buckets(st) < 0) {
            bw_seterr(err, errsize, "out of memory");
            bw_store_destroy(st);
            return NULL;
        }
        for (int i = 0; i < N_SLOTS; i++)
            st->slot_node[i] = -1;
        st->refresh = 1;
    }
    st->timers = *timers;
    for (int i = 0; i < S_COUNT; i++) {
        const char *src = *scripts[i];
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int mdlen = 0;
        /* EVALSHA names a script by the SHA-1 of its text, as Redis computes it. */
        EVP_Digest(src, strlen(src), md, &mdlen, EVP_sha1(), NULL);
        for (int j = 0; j < 20; j++)
            snprintf(st->sha[i] + 2 * j, 3, "%02x", md[j]);
    }
    return st;
}

int bw_store_layout_conflict(const bw_store *st)
{
    return st->layout_conflict;
}

void bw_store_shadow(bw_store *st)
{
    snprintf(st->ns, sizeof(st->ns), "bws");
}

int bw_store_is_cluster(const bw_store *st)
{
    return st->cluster;
}

void bw_store_destroy(bw_store *st)
{
    if (!st)
        return;
    for (int i = 0; i < st->n_nodes; i++)
        if (st->nodes[i].c)
            redisFree(st->nodes[i].c);
    free(st->slot_node);
    free(st->btag);
    free(st->bslot);
    free(st);
}

static void drop_node(bw_store *st, int ni)
{
    if (st->nodes[ni].c) {
        redisFree(st->nodes[ni].c);
        st->nodes[ni].c = NULL;
    }
    if (st->cluster)
        st->refresh = 1; /* the node may have failed over */
}

/* Connect node @p ni if needed (at most one attempt per 200 ms). @returns 0 if connected. */
static int ensure_node(bw_store *st, int ni)
{
    struct timeval tv = {2, 0};
    rnode *nd = &st->nodes[ni];
    redisReply *r;

    if (nd->c)
        return 0;
    if (bw_mono_ms() < nd->next_connect_ms)
        return -1;
    nd->next_connect_ms = bw_mono_ms() + 200;
    nd->c = st->unix_socket ? redisConnectUnixWithTimeout(st->path, tv)
                            : redisConnectWithTimeout(nd->host, nd->port, tv);
    if (!nd->c || nd->c->err) {
        bw_log(BW_LOG_WARN, "redis connect failed", "error",
               nd->c ? nd->c->errstr : "out of memory", "node",
               st->unix_socket ? st->path : nd->host, NULL);
        drop_node(st, ni);
        return -1;
    }
    redisSetTimeout(nd->c, (struct timeval){10, 0});
    if (st->password[0]) {
        r = redisCommand(nd->c, "AUTH %s", st->password);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            bw_log(BW_LOG_ERROR, "redis AUTH failed", NULL);
            if (r)
                freeReplyObject(r);
            drop_node(st, ni);
            return -1;
        }
        freeReplyObject(r);
    }
    if (st->db) {
        r = redisCommand(nd->c, "SELECT %d", st->db);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            if (r)
                freeReplyObject(r);
            drop_node(st, ni);
            return -1;
        }
        freeReplyObject(r);
    }
    return 0;
}

/* Load the slot map with CLUSTER SLOTS from the first node that answers. */
static int refresh_slots(bw_store *st)
{
    for (int ni = 0; ni < st->n_nodes; ni++) {
        redisReply *r;
        if (ensure_node(st, ni) < 0)
            continue;
        r = redisCommand(st->nodes[ni].c, "CLUSTER SLOTS");
        if (!r) {
            drop_node(st, ni);
            continue;
        }
        if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
            freeReplyObject(r);
            continue;
        }
        for (int i = 0; i < N_SLOTS; i++)
            st->slot_node[i] = -1;
        for (size_t i = 0; i < r->elements; i++) {
            const redisReply *e = r->element[i], *m;
            const char *host;
            size_t hostlen;
            int owner;
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
                e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2)
                continue;
            m = e->element[2];
            host = m->element[0]->str;
            hostlen = m->element[0]->len;
            if (!host || hostlen == 0) { /* "" = the node that answered */
                host = st->nodes[ni].host;
                hostlen = strlen(host);
            }
            owner = add_node(st, host, hostlen, (int)m->element[1]->integer);
            if (owner < 0)
                continue;
            for (long long s = e->element[0]->integer; s <= e->element[1]->integer && s < N_SLOTS;
                 s++)
                if (s >= 0)
                    st->slot_node[s] = (int16_t)owner;
        }
        freeReplyObject(r);
        st->refresh = 0;
        return 0;
    }
    bw_log(BW_LOG_WARN, "redis cluster: no node answered CLUSTER SLOTS", NULL);
    return -1;
}

static int node_for_slot(bw_store *st, int slot)
{
    if (!st->cluster)
        return 0;
    if (st->refresh)
        refresh_slots(st);
    return st->slot_node[slot] >= 0 ? st->slot_node[slot] : 0;
}

/* "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381": the node's index. */
static int redirect_node(bw_store *st, const redisReply *r)
{
    const char *sp = memchr(r->str, ' ', r->len), *addr;
    if (!sp || !(addr = memchr(sp + 1, ' ', r->len - (size_t)(sp + 1 - r->str))))
        return -1;
    addr++;
    return add_node_addr(st, addr, r->len - (size_t)(addr - r->str));
}

/* One command to Redis. slot < 0 for a single server. */
typedef struct rcmd {
    int slot;
    int script; /* S_* for EVALSHA (loaded on NOSCRIPT), -1 otherwise */
    int argc;
    const char **argv;
    const size_t *argvlen;
} rcmd;

/*
 * Run one command: to the node that owns its slot, following MOVED (the slot
 * map is then reloaded) and ASK (ASKING first) redirects, waiting on TRYAGAIN
 * (a slot being migrated), loading the script on NOSCRIPT (after a restart or
 * on a new node). An I/O error drops the connection and is not retried here:
 * the caller retries. @returns the reply (caller frees) or NULL; an error
 * reply is logged and returned as NULL.
 */
static redisReply *exec_one(bw_store *st, const rcmd *cmd)
{
    int ask = -1;

    for (int attempt = 0; attempt < MAX_REDIRECTS; attempt++) {
        int ni = ask >= 0 ? ask : node_for_slot(st, cmd->slot);
        int asking = ask >= 0;
        redisContext *c;
        redisReply *r = NULL;

        ask = -1;
        if (ensure_node(st, ni) < 0)
            return NULL;
        c = st->nodes[ni].c;
        if (asking)
            redisAppendCommand(c, "ASKING");
        redisAppendCommandArgv(c, cmd->argc, cmd->argv, cmd->argvlen);
        if (asking) {
            if (redisGetReply(c, (void **)&r) != REDIS_OK) {
                drop_node(st, ni);
                return NULL;
            }
            freeReplyObject(r);
            r = NULL;
        }
        if (redisGetReply(c, (void **)&r) != REDIS_OK || !r) {
            bw_log(BW_LOG_WARN, "redis command failed", "error", c->errstr, NULL);
            drop_node(st, ni);
            return NULL;
        }
        if (r->type != REDIS_REPLY_ERROR)
            return r;
        if (st->cluster && strncmp(r->str, "MOVED ", 6) == 0) {
            int to = redirect_node(st, r);
            if (to >= 0 && cmd->slot >= 0)
                st->slot_node[cmd->slot] = (int16_t)to;
            st->refresh = 1;
            freeReplyObject(r);
            continue;
        }
        if (st->cluster && strncmp(r->str, "ASK ", 4) == 0) {
            ask = redirect_node(st, r);
            freeReplyObject(r);
            if (ask < 0)
                return NULL;
            continue;
        }
        if (st->cluster && strncmp(r->str, "TRYAGAIN", 8) == 0) {
            freeReplyObject(r);
            sleep_ms(20);
            continue;
        }
        if (cmd->script >= 0 && strncmp(r->str, "NOSCRIPT", 8) == 0) {
            redisReply *lr;
            freeReplyObject(r);
            if (asking)
                redisAppendCommand(c, "ASKING");
            redisAppendCommand(c, "SCRIPT LOAD %s", *scripts[cmd->script]);
            for (int k = 0; k < 1 + asking; k++) {
                if (redisGetReply(c, (void **)&lr) != REDIS_OK) {
                    drop_node(st, ni);
                    return NULL;
                }
                freeReplyObject(lr);
            }
            if (asking)
                ask = ni;
            continue;
        }
        bw_log(BW_LOG_ERROR, "redis error", "error", r->str, NULL);
        freeReplyObject(r);
        return NULL;
    }
    bw_log(BW_LOG_WARN, "redis cluster: too many redirects", NULL);
    return NULL;
}

/*
 * Run @p n commands pipelined (one round trip per node), then any that got an
 * error reply (a redirect, NOSCRIPT) again one by one through exec_one, once
 * every pipelined reply was read. replies[i] is NULL where the command failed.
 */
static void exec_many(bw_store *st, const rcmd *cmds, size_t n, redisReply **replies)
{
    int *to = malloc((n ? n : 1) * sizeof(int));

    for (size_t i = 0; i < n; i++)
        replies[i] = NULL;
    if (!to)
        return;
    /* where each goes: may reload the slot map, so before anything is queued */
    for (size_t i = 0; i < n; i++)
        to[i] = node_for_slot(st, cmds[i].slot);
    for (size_t i = 0; i < n; i++) {
        if (ensure_node(st, to[i]) < 0) {
            to[i] = -1;
            continue;
        }
        redisAppendCommandArgv(st->nodes[to[i]].c, cmds[i].argc, cmds[i].argv, cmds[i].argvlen);
    }
    for (size_t i = 0; i < n; i++) {
        int ni = to[i];
        if (ni < 0 || !st->nodes[ni].c)
            continue; /* not sent, or its connection failed: NULL */
        if (redisGetReply(st->nodes[ni].c, (void **)&replies[i]) != REDIS_OK || !replies[i]) {
            bw_log(BW_LOG_WARN, "redis command failed", "error", st->nodes[ni].c->errstr, NULL);
            replies[i] = NULL;
            drop_node(st, ni);
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (replies[i] && replies[i]->type == REDIS_REPLY_ERROR) {
            freeReplyObject(replies[i]);
            replies[i] = exec_one(st, &cmds[i]);
        }
    }
    free(to);
}

/*
 * Run script @p which with argv-style arguments (after "EVALSHA sha nkeys");
 * argv[0] is its first key, which names the slot.
 */
static redisReply *run_script(bw_store *st, int which, int nkeys, int argc, const char **argv,
                              const size_t *argvlen)
{
    const char **av = malloc(sizeof(char *) * (size_t)(argc + 3));
    size_t *al = malloc(sizeof(size_t) * (size_t)(argc + 3));
    char nk[16];
    redisReply *r = NULL;
    rcmd cmd;

    if (!av || !al)
        goto out;
    snprintf(nk, sizeof(nk), "%d", nkeys);
    av[0] = "EVALSHA";
    al[0] = 7;
    av[1] = st->sha[which];
    al[1] = 40;
    av[2] = nk;
    al[2] = strlen(nk);
    for (int i = 0; i < argc; i++) {
        av[i + 3] = argv[i];
        al[i + 3] = argvlen ? argvlen[i] : strlen(argv[i]);
    }
    cmd.slot = st->cluster && nkeys > 0 ? key_slot(argv[0]) : -1;
    cmd.script = which;
    cmd.argc = argc + 3;
    cmd.argv = av;
    cmd.argvlen = al;
    r = exec_one(st, &cmd);
out:
    free(av);
    free(al);
    return r;
}

/* A plain command with string arguments, routed by the slot of @p key. */
static redisReply *run_cmd(bw_store *st, const char *key, int argc, const char **argv)
{
    rcmd cmd = {st->cluster ? key_slot(key) : -1, -1, argc, argv, NULL};
    return exec_one(st, &cmd);
}

int bw_store_ping(bw_store *st)
{
    const char *argv[1] = {"PING"};
    int masters[MAX_NODES] = {0}, ok = 0;

    if (!st->cluster) {
        redisReply *r = run_cmd(st, "", 1, argv);
        ok = r && r->type == REDIS_REPLY_STATUS;
        if (r)
            freeReplyObject(r);
        return ok ? 0 : -1;
    }
    /* every master that holds a bucket must answer */
    for (int b = 0; b < st->n_buckets; b++)
        masters[node_for_slot(st, st->bslot[b])] = 1;
    for (int ni = 0; ni < st->n_nodes; ni++) {
        redisReply *r;
        if (!masters[ni])
            continue;
        if (ensure_node(st, ni) < 0)
            return -1;
        r = redisCommand(st->nodes[ni].c, "PING");
        if (!r) {
            drop_node(st, ni);
            return -1;
        }
        ok = r->type == REDIS_REPLY_STATUS;
        freeReplyObject(r);
        if (!ok)
            return -1;
    }
    return st->refresh && refresh_slots(st) < 0 ? -1 : 0;
}

/*
 * A cluster's bucket count decides which keys hold a request's state: workers
 * with another count would not see it (a request charged again, events
 * counted twice). The first worker records its count in the cluster; a worker
 * with another one refuses every operation (and logs why) instead.
 * @returns 0 when the layout matches (always on a single server), -1 if not
 * (or if Redis could not be asked: retried on the next operation).
 */
static int check_layout(bw_store *st)
{
    char key[16], want[32];
    const char *set[5] = {"SET", key, want, "NX", NULL};
    const char *get[2] = {"GET", key};
    redisReply *r;
    int ok;

    if (!st->cluster)
        return 0;
    /* checked again now and then: a lost bw:layout is written back, and a
     * worker counting otherwise then notices within LAYOUT_RECHECK_MS */
    if (st->layout_ok && bw_mono_ms() - st->layout_checked_ms < LAYOUT_RECHECK_MS)
        return 0;
    snprintf(key, sizeof(key), "%s:layout", st->ns); /* one key, whatever the bucket count */
    snprintf(want, sizeof(want), "buckets=%d", st->n_buckets);
    if (!(r = run_cmd(st, key, 4, set)))
        return -1;
    freeReplyObject(r);
    if (!(r = run_cmd(st, key, 2, get)))
        return -1;
    ok = r->type == REDIS_REPLY_STRING && strcmp(r->str, want) == 0;
    if (!ok && !st->layout_conflict) /* once per store, not per operation */
        bw_log(BW_LOG_ERROR, "redis cluster holds another layout: refusing to touch it", "stored",
               r->type == REDIS_REPLY_STRING ? r->str : "?", "configured", want, "hint",
               "every worker of a cluster needs the same ?buckets= of its redis url", NULL);
    freeReplyObject(r);
    st->layout_ok = ok;
    st->layout_conflict = !ok;
    st->layout_checked_ms = bw_mono_ms();
    return ok ? 0 : -1;
}
int bw_store_check_layout(bw_store *st)
{
    return check_layout(st) == 0 ? 0 : st->layout_conflict ? -2 : -1;
}

/* Keys. A single server: "bw:{<enc>}:m", "bw:due", "bw:outbox". A cluster:
 * "bw:{<bucket tag>}:<enc>:m", "bw:{<bucket tag>}:due", ... */
static void request_key(const bw_store *st, char *buf, size_t size, const char *enc, char suffix)
{
    if (st->cluster)
        snprintf(buf, size, "%s:{%s}:%s:%c", st->ns, st->btag[bucket_of(st, enc)], enc, suffix);
    else
        snprintf(buf, size, "%s:{%s}:%c", st->ns, enc, suffix);
}

static void bucket_key(const bw_store *st, char *buf, size_t size, int b, const char *name)
{
    if (st->cluster)
        snprintf(buf, size, "%s:{%s}:%s", st->ns, st->btag[b], name);
    else
        snprintf(buf, size, "%s:%s", st->ns, name);
}

/* Compact, order-stable text of an event's billable content. */
static int compact_event(const bw_event *ev, char *buf, size_t size)
{
    const bw_usage *u = &ev->usage;
    switch (ev->type) {
    case BW_EV_MODEL:
        return snprintf(buf, size,
                        "M|%d|%d|%" PRIu64 "|%" PRIu64 "|%" PRIu64 "|%" PRIu64 "|%" PRIu64 "|%s",
                        ev->failed, ev->usage_shape != BW_USAGE_NONE, u->input, u->cache_read,
                        u->cache_write, u->output, u->reasoning, ev->name);
    case BW_EV_TOOL:
        return snprintf(buf, size, "T|%d|%" PRIu64 "|%s", ev->failed, ev->units, ev->name);
    case BW_EV_FINALIZE:
        if (ev->has_expected)
            return snprintf(buf, size, "F|%s|%" PRIu64 ":%" PRIu64, ev->final_status,
                            ev->expected_model_calls, ev->expected_tool_calls);
        return snprintf(buf, size, "F|%s|", ev->final_status);
    default:
        return -1;
    }
}

#define APPLY_ARGS  8
#define COMPACT_MAX (BW_NAME_MAX + 160)

int bw_store_apply(bw_store *st, bw_event *const *evs, size_t n, int *results, char *err,
                   size_t errsize)
{
    /* Events are grouped by bucket (one group on a single server): one script
     * call per group, all pipelined. */
    size_t nb = (size_t)st->n_buckets, ng = 0, used = 0;
    int *bk = malloc((n ? n : 1) * sizeof(int));
    size_t *order = malloc((n ? n : 1) * sizeof(size_t));
    size_t *start = calloc(nb + 1, sizeof(size_t));
    size_t *gsize = calloc(nb, sizeof(size_t));
    const char **av = calloc(16 * n + 8, sizeof(char *));
    char(*keys)[KEY_MAX] = calloc(2 * n + 1, KEY_MAX);
    char(*compact)[COMPACT_MAX] = calloc(n + 1, COMPACT_MAX);
    char(*expected)[48] = calloc(n + 1, 48);
    char(*dkeys)[KEY_MAX] = calloc(nb, KEY_MAX);
    char(*nks)[16] = calloc(nb, 16);
    rcmd *cmds = calloc(nb, sizeof(rcmd));
    int *gbucket = calloc(nb, sizeof(int));
    redisReply **replies = calloc(nb, sizeof(redisReply *));
    char rto[24], grace[24];
    int rc = -1;

    if (!bk || !order || !start || !gsize || !av || !keys || !compact || !expected || !dkeys ||
        !nks || !cmds || !gbucket || !replies) {
        bw_seterr(err, errsize, "out of memory");
        goto out;
    }
    if (check_layout(st) < 0) {
        bw_seterr(err, errsize, "redis cluster layout not confirmed (see the log)");
        goto out;
    }
    snprintf(rto, sizeof(rto), "%" PRId64, st->timers.request_timeout_ms);
    snprintf(grace, sizeof(grace), "%" PRId64, st->timers.finalize_grace_ms);
    for (size_t i = 0; i < n; i++) {
        const bw_event *ev = evs[i];
        char enc[BW_ENC_ID_MAX + 1];

        bw_pct_encode(ev->request_id, strlen(ev->request_id), enc, sizeof(enc));
        bk[i] = bucket_of(st, enc);
        gsize[bk[i]]++;
        request_key(st, keys[2 * i], KEY_MAX, enc, 'm');
        request_key(st, keys[2 * i + 1], KEY_MAX, enc, 'e');
        compact_event(ev, compact[i], COMPACT_MAX);
        if (ev->type == BW_EV_FINALIZE && ev->has_expected)
            snprintf(expected[i], 48, "%" PRIu64 ":%" PRIu64, ev->expected_model_calls,
                     ev->expected_tool_calls);
    }
    for (size_t b = 0; b < nb; b++)
        start[b + 1] = start[b] + gsize[b];
    {
        size_t *fill = gsize; /* reused as the fill position of each bucket */
        for (size_t b = 0; b < nb; b++)
            fill[b] = start[b];
        for (size_t i = 0; i < n; i++)
            order[fill[bk[i]]++] = i;
    }
    for (size_t b = 0; b < nb; b++) {
        size_t cnt = start[b + 1] - start[b];
        int nkeys = (int)(1 + 2 * cnt);
        const char **g = av + used;

        if (cnt == 0)
            continue;
        bucket_key(st, dkeys[ng], KEY_MAX, (int)b, "due");
        snprintf(nks[ng], 16, "%d", nkeys);
        g[0] = "EVALSHA";
        g[1] = st->sha[S_APPLY];
        g[2] = nks[ng];
        g[3] = dkeys[ng];
        g[3 + nkeys] = rto;
        g[4 + nkeys] = grace;
        for (size_t k = 0; k < cnt; k++) {
            size_t i = order[start[b] + k];
            const bw_event *ev = evs[i];
            const char **a = g + 5 + nkeys + APPLY_ARGS * k;

            g[4 + 2 * k] = keys[2 * i];
            g[5 + 2 * k] = keys[2 * i + 1];
            a[0] = ev->request_id;
            a[1] = bw_event_dedup_key(ev);
            a[2] = ev->type == BW_EV_MODEL ? "M" : ev->type == BW_EV_TOOL ? "T" : "F";
            a[3] = compact[i];
            a[4] = ev->user_id;
            a[5] = ev->session_id;
            a[6] = ev->org_id;
            a[7] = expected[i];
        }
        cmds[ng].slot = st->cluster ? st->bslot[b] : -1;
        cmds[ng].script = S_APPLY;
        cmds[ng].argc = 5 + nkeys + APPLY_ARGS * (int)cnt;
        cmds[ng].argv = g;
        cmds[ng].argvlen = NULL;
        gbucket[ng] = (int)b;
        used += (size_t)cmds[ng].argc;
        ng++;
    }
    exec_many(st, cmds, ng, replies);
    rc = 0;
    for (size_t gi = 0; gi < ng; gi++) {
        size_t b = (size_t)gbucket[gi], cnt = start[b + 1] - start[b];
        redisReply *r = replies[gi];
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != cnt) {
            rc = -1; /* the caller applies the whole batch again: dedup makes that safe */
            continue;
        }
        for (size_t k = 0; k < cnt; k++)
            results[order[start[b] + k]] = (int)r->element[k]->integer;
    }
    if (rc < 0)
        bw_seterr(err, errsize, "redis apply failed");
out:
    for (size_t gi = 0; replies && gi < ng; gi++)
        if (replies[gi])
            freeReplyObject(replies[gi]);
    free(bk);
    free(order);
    free(start);
    free(gsize);
    free(av);
    free(keys);
    free(compact);
    free(expected);
    free(dkeys);
    free(nks);
    free(cmds);
    free(gbucket);
    free(replies);
    return rc;
}

void bw_store_free_strings(char **v, size_t n)
{
    if (!v)
        return;
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* Append the request ids of a CLAIM reply to *v (grown). */
static int take_ids(const redisReply *r, char ***v, size_t *nv)
{
    char **nvv = realloc(*v, (*nv + r->elements + 1) * sizeof(char *));
    if (!nvv)
        return -1;
    *v = nvv;
    for (size_t i = 0; i < r->elements; i++) {
        char *id = strndup(r->element[i]->str, r->element[i]->len);
        if (!id)
            return -1;
        (*v)[(*nv)++] = id;
        (*v)[*nv] = NULL;
    }
    return 0;
}

int bw_store_claim_due(bw_store *st, size_t max, char ***rids)
{
    size_t nb = (size_t)st->n_buckets, nv = 0;
    char lease[24];
    char **v = calloc(1, sizeof(char *));
    int *cand = calloc(nb, sizeof(int));
    int ok = 1;

    *rids = NULL;
    if (!v || !cand || check_layout(st) < 0)
        goto fail;
    snprintf(lease, sizeof(lease), "%" PRId64, st->timers.lease_ms);
    if (nb == 1) {
        cand[0] = 1;
    } else {
        /* A cluster: peek at each bucket's earliest entry (read-only, pipelined)
         * and claim only where something is, or is about to be, due. */
        char(*dk)[KEY_MAX] = calloc(nb, KEY_MAX);
        const char *(*av)[6] = calloc(nb, sizeof(*av));
        rcmd *cmds = calloc(nb, sizeof(rcmd));
        redisReply **rep = calloc(nb, sizeof(redisReply *));
        int64_t horizon = bw_now_ms() + CLUSTER_PEEK_AHEAD_MS;

        if (!dk || !av || !cmds || !rep) {
            free(dk);
            free(av);
            free(cmds);
            free(rep);
            goto fail;
        }
        for (size_t b = 0; b < nb; b++) {
            const char **a = av[b];
            bucket_key(st, dk[b], KEY_MAX, (int)b, "due");
            a[0] = "ZRANGE";
            a[1] = dk[b];
            a[2] = "0";
            a[3] = "0";
            a[4] = "WITHSCORES";
            cmds[b] = (rcmd){st->bslot[b], -1, 5, a, NULL};
        }
        exec_many(st, cmds, nb, rep);
        for (size_t b = 0; b < nb; b++) {
            if (!rep[b]) {
                ok = 0;
                continue;
            }
            if (rep[b]->type == REDIS_REPLY_ARRAY && rep[b]->elements == 2 &&
                strtoll(rep[b]->element[1]->str, NULL, 10) <= horizon)
                cand[b] = 1;
            freeReplyObject(rep[b]);
        }
        free(dk);
        free(av);
        free(cmds);
        free(rep);
    }
    for (size_t k = 0; k < nb && nv < max; k++) {
        size_t b = (st->next_bucket + k) % nb;
        char kd[KEY_MAX], mx[24];
        const char *argv[3];
        redisReply *r;

        if (!cand[b])
            continue;
        bucket_key(st, kd, sizeof(kd), (int)b, "due");
        snprintf(mx, sizeof(mx), "%zu", max - nv);
        argv[0] = kd;
        argv[1] = lease;
        argv[2] = mx;
        r = run_script(st, S_CLAIM, 1, 3, argv, NULL);
        if (!r || r->type != REDIS_REPLY_ARRAY) {
            if (r)
                freeReplyObject(r);
            ok = 0;
            continue;
        }
        if (take_ids(r, &v, &nv) < 0) {
            freeReplyObject(r);
            goto fail; /* the leased ones come back when the lease expires */
        }
        freeReplyObject(r);
    }
    st->next_bucket = (st->next_bucket + 1) % (unsigned)nb;
    free(cand);
    if (!ok && nv == 0) {
        free(v);
        return -1;
    }
    *rids = v;
    return (int)nv;
fail:
    free(cand);
    bw_store_free_strings(v, nv);
    return -1;
}

static void copy_reply_str(char *dst, size_t size, const redisReply *e)
{
    size_t n = 0;
    if (e && (e->type == REDIS_REPLY_STRING || e->type == REDIS_REPLY_STATUS)) {
        n = e->len < size - 1 ? e->len : size - 1;
        memcpy(dst, e->str, n);
    }
    dst[n] = '\0';
}

/* Parse "M|failed|has_usage|in|cr|cw|out|re|name" or "T|failed|units|name". */
static int parse_compact(const char *s, bw_call *call, char **name)
{
    char *end;
    const char *p = s + 2;

    memset(call, 0, sizeof(*call));
    if (s[0] == 'M' && s[1] == '|') {
        uint64_t *f[5] = {&call->usage.input, &call->usage.cache_read, &call->usage.cache_write,
                          &call->usage.output, &call->usage.reasoning};
        call->type = BW_EV_MODEL;
        call->failed = (int)strtol(p, &end, 10);
        call->has_usage = (int)strtol(end + 1, &end, 10);
        for (int i = 0; i < 5; i++)
            *f[i] = strtoull(end + 1, &end, 10);
        *name = strdup(end + 1);
    } else if (s[0] == 'T' && s[1] == '|') {
        call->type = BW_EV_TOOL;
        call->failed = (int)strtol(p, &end, 10);
        call->units = strtoull(end + 1, &end, 10);
        *name = strdup(end + 1);
    } else {
        return 0; /* a finalize marker: nothing to price */
    }
    if (!*name)
        return -1;
    call->name = *name;
    return 1;
}

int bw_store_load(bw_store *st, const char *request_id, bw_claim *c)
{
    char enc[BW_ENC_ID_MAX + 1], kd[KEY_MAX], km[KEY_MAX], ke[KEY_MAX], ks[KEY_MAX], lease[24];
    const char *argv[6];
    redisReply *r;
    int rc = -1;

    memset(c, 0, sizeof(*c));
    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    bucket_key(st, kd, sizeof(kd), bucket_of(st, enc), "due");
    request_key(st, km, sizeof(km), enc, 'm');
    request_key(st, ke, sizeof(ke), enc, 'e');
    request_key(st, ks, sizeof(ks), enc, 's');
    snprintf(lease, sizeof(lease), "%" PRId64, st->timers.lease_ms);
    argv[0] = km;
    argv[1] = ke;
    argv[2] = ks;
    argv[3] = kd;
    argv[4] = request_id;
    argv[5] = lease;
    r = run_script(st, S_LOAD, 4, 6, argv, NULL);
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 1)
        goto out;
    if (r->element[0]->integer == 0) {
        rc = 0;
        goto out;
    }
    if (r->elements < 9)
        goto out;
    snprintf(c->request_id, sizeof(c->request_id), "%s", request_id);
    c->gen = (int)r->element[1]->integer;
    copy_reply_str(c->user_id, sizeof(c->user_id), r->element[2]);
    copy_reply_str(c->session_id, sizeof(c->session_id), r->element[3]);
    copy_reply_str(c->org_id, sizeof(c->org_id), r->element[4]);
    copy_reply_str(c->finalize, sizeof(c->finalize), r->element[5]);
    if (r->element[6]->len > 0)
        c->intent = strndup(r->element[6]->str, r->element[6]->len);
    c->wallet_only = r->element[7]->len == 1 && r->element[7]->str[0] == '1';
    c->attempts = atoi(r->element[8]->str ? r->element[8]->str : "0");
    c->calls = calloc(r->elements, sizeof(bw_call));
    c->names = calloc(r->elements, sizeof(char *));
    if (!c->calls || !c->names)
        goto out;
    for (size_t i = 9; i < r->elements; i++) {
        char *s = strndup(r->element[i]->str, r->element[i]->len);
        char *name = NULL;
        int k = s ? parse_compact(s, &c->calls[c->n_calls], &name) : -1;
        free(s);
        if (k < 0)
            goto out;
        if (k == 1) {
            c->names[c->n_calls] = name;
            c->n_calls++;
        }
    }
    rc = 1;
out:
    if (rc < 0)
        bw_claim_free(c);
    if (r)
        freeReplyObject(r);
    return rc;
}

void bw_claim_free(bw_claim *c)
{
    if (c->names)
        for (size_t i = 0; i < c->n_calls; i++)
            free(c->names[i]);
    free(c->names);
    free(c->calls);
    free(c->intent);
    memset(c, 0, sizeof(*c));
}

int bw_store_put_intent(bw_store *st, const char *request_id, int gen, const char *intent,
                        char **stored)
{
    char enc[BW_ENC_ID_MAX + 1], ks[KEY_MAX], g[16];
    const char *argv[3];
    redisReply *r;

    *stored = NULL;
    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    request_key(st, ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    argv[0] = ks;
    argv[1] = g;
    argv[2] = intent;
    r = run_script(st, S_INTENT, 1, 3, argv, NULL);
    if (!r || r->type != REDIS_REPLY_STRING) {
        if (r)
            freeReplyObject(r);
        return -1;
    }
    *stored = strndup(r->str, r->len);
    freeReplyObject(r);
    return *stored ? 0 : -1;
}

int bw_store_complete(bw_store *st, const char *request_id, int gen, const char *record)
{
    char enc[BW_ENC_ID_MAX + 1], kd[KEY_MAX], ko[KEY_MAX], koz[KEY_MAX], km[KEY_MAX], ke[KEY_MAX],
        ks[KEY_MAX], g[16], ret[24], gr[24];
    char field[BW_ENC_ID_MAX + 24];
    const char *argv[12];
    redisReply *r;
    int rc;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    bucket_key(st, kd, sizeof(kd), bucket_of(st, enc), "due");
    bucket_key(st, ko, sizeof(ko), bucket_of(st, enc), "outbox");
    bucket_key(st, koz, sizeof(koz), bucket_of(st, enc), "outbox:z");
    request_key(st, km, sizeof(km), enc, 'm');
    request_key(st, ke, sizeof(ke), enc, 'e');
    request_key(st, ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    snprintf(ret, sizeof(ret), "%" PRId64, st->timers.retention_ms);
    snprintf(gr, sizeof(gr), "%" PRId64, st->timers.finalize_grace_ms);
    snprintf(field, sizeof(field), "%s:%d", enc, gen);
    argv[0] = km;
    argv[1] = ke;
    argv[2] = ks;
    argv[3] = kd;
    argv[4] = ko;
    argv[5] = koz;
    argv[6] = request_id;
    argv[7] = g;
    argv[8] = record;
    argv[9] = ret;
    argv[10] = gr;
    argv[11] = field;
    r = run_script(st, S_COMPLETE, 6, 12, argv, NULL);
    if (!r || r->type != REDIS_REPLY_INTEGER) {
        if (r)
            freeReplyObject(r);
        return -1;
    }
    rc = (int)r->integer;
    freeReplyObject(r);
    return rc;
}

long long bw_store_begin_attempt(bw_store *st, const char *request_id, int gen)
{
    char enc[BW_ENC_ID_MAX + 1], km[KEY_MAX], ks[KEY_MAX], g[16];
    const char *argv[3];
    redisReply *r;
    long long rc;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    request_key(st, km, sizeof(km), enc, 'm');
    request_key(st, ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    argv[0] = km;
    argv[1] = ks;
    argv[2] = g;
    r = run_script(st, S_BEGIN, 2, 3, argv, NULL);
    if (!r || r->type != REDIS_REPLY_INTEGER) {
        if (r)
            freeReplyObject(r);
        return -1;
    }
    rc = r->integer;
    freeReplyObject(r);
    return rc;
}

int bw_store_fallback_ok(bw_store *st, const char *request_id, int gen, long long attempt)
{
    char enc[BW_ENC_ID_MAX + 1], kd[KEY_MAX], ks[KEY_MAX], g[16], n[24], lease[24];
    const char *argv[6];
    redisReply *r;
    int rc;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    bucket_key(st, kd, sizeof(kd), bucket_of(st, enc), "due");
    request_key(st, ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    snprintf(n, sizeof(n), "%lld", attempt);
    snprintf(lease, sizeof(lease), "%" PRId64, st->timers.lease_ms);
    argv[0] = ks;
    argv[1] = kd;
    argv[2] = g;
    argv[3] = n;
    argv[4] = request_id;
    argv[5] = lease;
    r = run_script(st, S_FALLBACK_OK, 2, 6, argv, NULL);
    rc = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    if (r)
        freeReplyObject(r);
    return rc; /* Redis unreachable: no fallback (the safe side) */
}

int bw_store_defer(bw_store *st, const char *request_id, int gen, int64_t delay_ms, int wallet_only)
{
    char enc[BW_ENC_ID_MAX + 1], kd[KEY_MAX], km[KEY_MAX], ks[KEY_MAX], g[16], d[24];
    const char *argv[7];
    redisReply *r;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    bucket_key(st, kd, sizeof(kd), bucket_of(st, enc), "due");
    request_key(st, km, sizeof(km), enc, 'm');
    request_key(st, ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    snprintf(d, sizeof(d), "%" PRId64, delay_ms);
    argv[0] = km;
    argv[1] = ks;
    argv[2] = kd;
    argv[3] = request_id;
    argv[4] = g;
    argv[5] = d;
    argv[6] = wallet_only ? "1" : "0";
    r = run_script(st, S_DEFER, 3, 7, argv, NULL);
    if (!r)
        return -1;
    freeReplyObject(r);
    return 0;
}

int bw_store_outbox_due(bw_store *st, int64_t min_age_ms, size_t max, char ***fields,
                        char ***records)
{
    size_t nb = (size_t)st->n_buckets, n = 0, cap = 0;
    char age[24], mx[24];
    char(*ko)[2][KEY_MAX] = calloc(nb, sizeof(*ko));
    const char *(*av)[7] = calloc(nb, sizeof(*av));
    rcmd *cmds = calloc(nb, sizeof(rcmd));
    redisReply **rep = calloc(nb, sizeof(redisReply *));
    char nk[] = "2";
    int failed = 0;

    *fields = *records = NULL;
    if (!ko || !av || !cmds || !rep || check_layout(st) < 0) {
        failed = 1;
        goto out;
    }
    snprintf(age, sizeof(age), "%" PRId64, min_age_ms);
    snprintf(mx, sizeof(mx), "%zu", max);
    for (size_t b = 0; b < nb; b++) {
        const char **a = av[b];
        bucket_key(st, ko[b][0], KEY_MAX, (int)b, "outbox");
        bucket_key(st, ko[b][1], KEY_MAX, (int)b, "outbox:z");
        a[0] = "EVALSHA";
        a[1] = st->sha[S_OUTBOX_DUE];
        a[2] = nk;
        a[3] = ko[b][0];
        a[4] = ko[b][1];
        a[5] = age;
        a[6] = mx;
        cmds[b] = (rcmd){st->cluster ? st->bslot[b] : -1, S_OUTBOX_DUE, 7, a, NULL};
    }
    exec_many(st, cmds, nb, rep);
    for (size_t b = 0; b < nb; b++) {
        if (!rep[b] || rep[b]->type != REDIS_REPLY_ARRAY) {
            failed = 1;
            continue;
        }
        cap += rep[b]->elements / 2;
    }
    *fields = calloc(cap + 1, sizeof(char *));
    *records = calloc(cap + 1, sizeof(char *));
    if (!*fields || !*records) {
        failed = 1;
        goto out;
    }
    for (size_t b = 0; b < nb; b++) {
        const redisReply *r = rep[b];
        if (!r || r->type != REDIS_REPLY_ARRAY)
            continue;
        for (size_t i = 0; i + 1 < r->elements; i += 2) {
            (*fields)[n] = strndup(r->element[i]->str, r->element[i]->len);
            (*records)[n] = strndup(r->element[i + 1]->str, r->element[i + 1]->len);
            if (!(*fields)[n] || !(*records)[n]) {
                free((*fields)[n]);
                free((*records)[n]);
                (*fields)[n] = (*records)[n] = NULL;
                failed = 1;
                continue;
            }
            n++;
        }
    }
out:
    for (size_t b = 0; rep && b < nb; b++)
        if (rep[b])
            freeReplyObject(rep[b]);
    free(ko);
    free(av);
    free(cmds);
    free(rep);
    if (failed && n == 0) {
        free(*fields);
        free(*records);
        *fields = *records = NULL;
        return -1;
    }
    return (int)n;
}

/* The bucket of an outbox field "<enc>:<gen>". */
static int field_bucket(const bw_store *st, const char *field)
{
    char enc[BW_ENC_ID_MAX + 1];
    const char *colon = strrchr(field, ':');
    size_t len = colon ? (size_t)(colon - field) : strlen(field);

    if (st->n_buckets == 1 || len > BW_ENC_ID_MAX)
        return 0;
    memcpy(enc, field, len);
    enc[len] = '\0';
    return bucket_of(st, enc);
}

int bw_store_outbox_done(bw_store *st, char *const *fields, size_t n)
{
    char(*ko)[2][KEY_MAX] = calloc(n ? n : 1, sizeof(*ko));
    const char *(*av)[2][3] = calloc(n ? n : 1, sizeof(*av));
    rcmd *cmds = calloc(2 * n + 1, sizeof(rcmd));
    redisReply **rep = calloc(2 * n + 1, sizeof(redisReply *));
    int rc = 0;

    if (!ko || !av || !cmds || !rep) {
        rc = -1;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        int b = field_bucket(st, fields[i]), slot = st->cluster ? st->bslot[b] : -1;
        bucket_key(st, ko[i][0], KEY_MAX, b, "outbox");
        bucket_key(st, ko[i][1], KEY_MAX, b, "outbox:z");
        av[i][0][0] = "HDEL";
        av[i][1][0] = "ZREM";
        for (int k = 0; k < 2; k++) {
            av[i][k][1] = ko[i][k];
            av[i][k][2] = fields[i];
            cmds[2 * i + (size_t)k] = (rcmd){slot, -1, 3, av[i][k], NULL};
        }
    }
    exec_many(st, cmds, 2 * n, rep);
    for (size_t i = 0; i < 2 * n; i++) {
        if (!rep[i])
            rc = -1;
        else
            freeReplyObject(rep[i]);
    }
out:
    free(ko);
    free(av);
    free(cmds);
    free(rep);
    return rc;
}

/* Sum of an integer command over every bucket's due index. */
static long long sum_over_buckets(bw_store *st, const char *cmd, const char *arg1, const char *arg2)
{
    size_t nb = (size_t)st->n_buckets;
    char(*dk)[KEY_MAX] = calloc(nb, KEY_MAX);
    const char *(*av)[4] = calloc(nb, sizeof(*av));
    rcmd *cmds = calloc(nb, sizeof(rcmd));
    redisReply **rep = calloc(nb, sizeof(redisReply *));
    long long sum = 0;

    if (!dk || !av || !cmds || !rep) {
        sum = -1;
        goto out;
    }
    for (size_t b = 0; b < nb; b++) {
        const char **a = av[b];
        bucket_key(st, dk[b], KEY_MAX, (int)b, "due");
        a[0] = cmd;
        a[1] = dk[b];
        a[2] = arg1;
        a[3] = arg2;
        cmds[b] = (rcmd){st->cluster ? st->bslot[b] : -1, -1, arg1 ? 4 : 2, a, NULL};
    }
    exec_many(st, cmds, nb, rep);
    for (size_t b = 0; b < nb; b++) {
        if (!rep[b] || rep[b]->type != REDIS_REPLY_INTEGER)
            sum = -1;
        else if (sum >= 0)
            sum += rep[b]->integer;
        if (rep[b])
            freeReplyObject(rep[b]);
    }
out:
    free(dk);
    free(av);
    free(cmds);
    free(rep);
    return sum;
}

long long bw_store_due_count(bw_store *st)
{
    return sum_over_buckets(st, "ZCARD", NULL, NULL);
}

long long bw_store_overdue_count(bw_store *st)
{
    char now[24];

    /* The client clock is close enough for a backpressure threshold. */
    snprintf(now, sizeof(now), "%" PRId64, bw_now_ms());
    return sum_over_buckets(st, "ZCOUNT", "-inf", now);
}

int bw_store_release(bw_store *st, const char *request_id)
{
    char enc[BW_ENC_ID_MAX + 1], kd[KEY_MAX];
    /* Score 0 is in the past for every clock: due again at once. */
    const char *argv[5] = {"ZADD", kd, "XX", "0", request_id};
    redisReply *r;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    bucket_key(st, kd, sizeof(kd), bucket_of(st, enc), "due");
    r = run_cmd(st, kd, 5, argv);
    if (!r)
        return -1;
    freeReplyObject(r);
    return 0;
}
