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

#include <hiredis/hiredis.h>
#include <openssl/evp.h>

#include "bw_log.h"
#include "bw_store.h"
#include "bw_util.h"

#define DUE_KEY     "bw:due"
#define OUTBOX_KEY  "bw:outbox"
#define OUTBOX_ZKEY "bw:outbox:z"
#define KEY_MAX     (BW_ENC_ID_MAX + 16)
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
 * (bw_apply_result).
 */
static const char *lua_apply = NOW_MS_LUA
    "local rto = tonumber(ARGV[1])\n"
    "local grace = tonumber(ARGV[2])\n"
    "local n = (#KEYS - 1) / 2\n"
    "local out = {}\n"
    "for i = 1, n do\n"
    "  local m = KEYS[2 * i]\n"
    "  local e = KEYS[2 * i + 1]\n"
    "  local b = 2 + (i - 1) * 8\n"
    "  local rid, dkey, kind, compact = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]\n"
    "  local user, sess, org, exp = ARGV[b + 5], ARGV[b + 6], ARGV[b + 7], ARGV[b + 8]\n"
    "  local cur = redis.call('HGET', m, 'user')\n"
    "  if cur and cur ~= user then\n"
    "    out[i] = 3\n"
    "  else\n"
    "    local old = redis.call('HGET', e, dkey)\n"
    "    if old then\n"
    "      local sep = string.find(old, '|', 1, true)\n"
    "      if string.sub(old, sep + 1) == compact then out[i] = 1 else out[i] = 2 end\n"
    "    else\n"
    "      if not cur then\n"
    "        redis.call('HSET', m, 'user', user, 'sess', sess, 'org', org, 'gen', 0, 'done', 0,\n"
    "                   'first', now)\n"
    "      end\n"
    "      local gen = tonumber(redis.call('HGET', m, 'gen'))\n"
    "      redis.call('HSET', e, dkey, gen .. '|' .. compact)\n"
    "      redis.call('HSET', m, 'last', now)\n"
    "      local cu = tonumber(redis.call('HGET', m, 'cu') or '0')\n"
    "      local due = nil\n"
    "      if gen == 0 then\n"
    "        out[i] = 0\n"
    "        if kind == 'M' then redis.call('HINCRBY', m, 'nm', 1)\n"
    "        elseif kind == 'T' then redis.call('HINCRBY', m, 'nt', 1)\n"
    "        elseif redis.call('HEXISTS', m, 'fin') == 0 then\n"
    "          redis.call('HSET', m, 'fin', now)\n"
    "          if exp ~= '' then\n"
    "            local c = string.find(exp, ':', 1, true)\n"
    "            redis.call('HSET', m, 'xm', string.sub(exp, 1, c - 1), 'xt', string.sub(exp, c + "
    "1))\n"
    "          end\n"
    "        end\n"
    "        local fin = redis.call('HGET', m, 'fin')\n"
    "        if not fin then\n"
    "          due = now + rto\n"
    "        else\n"
    "          local xm = redis.call('HGET', m, 'xm')\n"
    "          if not xm then\n"
    "            due = now\n"
    "          else\n"
    "            local nm = tonumber(redis.call('HGET', m, 'nm') or '0')\n"
    "            local nt = tonumber(redis.call('HGET', m, 'nt') or '0')\n"
    "            if nm >= tonumber(xm) and nt >= tonumber(redis.call('HGET', m, 'xt')) then\n"
    "              due = now\n"
    "            elseif kind == 'F' then\n"
    "              due = tonumber(fin) + grace\n"
    "            end\n"
    "          end\n"
    "        end\n"
    "        if due then\n"
    "          if due < cu then due = cu end\n"
    "          redis.call('ZADD', KEYS[1], due, rid)\n"
    "        end\n"
    "      else\n"
    "        out[i] = 4\n"
    "        if kind ~= 'F' then\n"
    "          redis.call('HINCRBY', m, 'late' .. gen, 1)\n"
    "          due = now + grace\n"
    "          if due < cu then due = cu end\n"
    "          redis.call('ZADD', KEYS[1], 'LT', due, rid)\n"
    "        end\n"
    "      end\n"
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

struct bw_store {
    redisContext *c;
    int unix_socket;
    char host[256];
    int port;
    char path[512];
    char password[256];
    int db;
    bw_store_timers timers;
    char sha[S_COUNT][41];
    int64_t next_connect_ms;
};

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
        return 0;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        bw_seterr(err, errsize, "redis url %s: expected redis:// or unix://", url);
        return -1;
    }
    p = url + 8;
    {
        const char *at = strchr(p, '@');
        if (at) {
            const char *colon = memchr(p, ':', (size_t)(at - p));
            const char *pw = colon ? colon + 1 : p;
            snprintf(st->password, sizeof(st->password), "%.*s", (int)(at - pw), pw);
            p = at + 1;
        }
    }
    {
        size_t hl = strcspn(p, ":/");
        snprintf(st->host, sizeof(st->host), "%.*s", (int)hl, p);
        p += hl;
        st->port = 6379;
        if (*p == ':') {
            st->port = atoi(p + 1);
            p += 1 + strspn(p + 1, "0123456789");
        }
        if (*p == '/' && p[1])
            st->db = atoi(p + 1);
    }
    if (!st->host[0] || st->port <= 0 || st->port > 65535) {
        bw_seterr(err, errsize, "redis url %s: bad host or port", url);
        return -1;
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
    if (parse_url(st, url, err, errsize) < 0) {
        free(st);
        return NULL;
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

void bw_store_destroy(bw_store *st)
{
    if (!st)
        return;
    if (st->c)
        redisFree(st->c);
    free(st);
}

static void drop_connection(bw_store *st)
{
    if (st->c) {
        redisFree(st->c);
        st->c = NULL;
    }
}

/* Connect if needed (at most one attempt per 200 ms). @returns 0 if connected. */
static int ensure_connected(bw_store *st)
{
    struct timeval tv = {2, 0};
    redisReply *r;

    if (st->c)
        return 0;
    if (bw_mono_ms() < st->next_connect_ms)
        return -1;
    st->next_connect_ms = bw_mono_ms() + 200;
    st->c = st->unix_socket ? redisConnectUnixWithTimeout(st->path, tv)
                            : redisConnectWithTimeout(st->host, st->port, tv);
    if (!st->c || st->c->err) {
        bw_log(BW_LOG_WARN, "redis connect failed", "error",
               st->c ? st->c->errstr : "out of memory", NULL);
        drop_connection(st);
        return -1;
    }
    redisSetTimeout(st->c, (struct timeval){10, 0});
    if (st->password[0]) {
        r = redisCommand(st->c, "AUTH %s", st->password);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            bw_log(BW_LOG_ERROR, "redis AUTH failed", NULL);
            if (r)
                freeReplyObject(r);
            drop_connection(st);
            return -1;
        }
        freeReplyObject(r);
    }
    if (st->db) {
        r = redisCommand(st->c, "SELECT %d", st->db);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            if (r)
                freeReplyObject(r);
            drop_connection(st);
            return -1;
        }
        freeReplyObject(r);
    }
    return 0;
}

/*
 * Run script @p which with argv-style arguments (after "EVALSHA sha nkeys").
 * Loads the script on NOSCRIPT (after a Redis restart) and retries once.
 * @returns the reply (caller frees) or NULL; an error reply is logged and
 * returned as NULL.
 */
static redisReply *run_script(bw_store *st, int which, int nkeys, int argc, const char **argv,
                              const size_t *argvlen)
{
    const char **av = malloc(sizeof(char *) * (size_t)(argc + 3));
    size_t *al = malloc(sizeof(size_t) * (size_t)(argc + 3));
    char nk[16];
    redisReply *r = NULL;

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
    for (int attempt = 0; attempt < 2; attempt++) {
        if (ensure_connected(st) < 0)
            goto out;
        r = redisCommandArgv(st->c, argc + 3, av, al);
        if (!r) {
            bw_log(BW_LOG_WARN, "redis command failed", "error", st->c->errstr, NULL);
            drop_connection(st);
            goto out;
        }
        if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
            redisReply *lr;
            freeReplyObject(r);
            r = NULL;
            lr = redisCommand(st->c, "SCRIPT LOAD %s", *scripts[which]);
            if (!lr) {
                drop_connection(st);
                goto out;
            }
            freeReplyObject(lr);
            continue;
        }
        break;
    }
    if (r && r->type == REDIS_REPLY_ERROR) {
        bw_log(BW_LOG_ERROR, "redis script error", "error", r->str, NULL);
        freeReplyObject(r);
        r = NULL;
    }
out:
    free(av);
    free(al);
    return r;
}

int bw_store_ping(bw_store *st)
{
    redisReply *r;
    int ok;

    if (ensure_connected(st) < 0)
        return -1;
    r = redisCommand(st->c, "PING");
    if (!r) {
        drop_connection(st);
        return -1;
    }
    ok = r->type == REDIS_REPLY_STATUS;
    freeReplyObject(r);
    return ok ? 0 : -1;
}

static void request_key(char *buf, size_t size, const char *enc, char suffix)
{
    snprintf(buf, size, "bw:{%s}:%c", enc, suffix);
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
    int nkeys = (int)(1 + 2 * n), argc = nkeys + 2 + (int)(APPLY_ARGS * n), rc = -1;
    const char **argv = calloc((size_t)argc, sizeof(char *));
    /* per event: two keys, compact, expected, and the encoded id */
    char(*keys)[KEY_MAX] = calloc(2 * n, KEY_MAX);
    char(*compact)[COMPACT_MAX] = calloc(n, COMPACT_MAX);
    char(*expected)[48] = calloc(n, 48);
    char rto[24], grace[24];
    redisReply *r = NULL;

    if (!argv || !keys || !compact || !expected) {
        bw_seterr(err, errsize, "out of memory");
        goto out;
    }
    argv[0] = DUE_KEY;
    snprintf(rto, sizeof(rto), "%" PRId64, st->timers.request_timeout_ms);
    snprintf(grace, sizeof(grace), "%" PRId64, st->timers.finalize_grace_ms);
    argv[nkeys] = rto;
    argv[nkeys + 1] = grace;
    for (size_t i = 0; i < n; i++) {
        const bw_event *ev = evs[i];
        char enc[BW_ENC_ID_MAX + 1];
        const char **a = argv + nkeys + 2 + APPLY_ARGS * i;

        bw_pct_encode(ev->request_id, strlen(ev->request_id), enc, sizeof(enc));
        request_key(keys[2 * i], KEY_MAX, enc, 'm');
        request_key(keys[2 * i + 1], KEY_MAX, enc, 'e');
        argv[1 + 2 * i] = keys[2 * i];
        argv[2 + 2 * i] = keys[2 * i + 1];
        compact_event(ev, compact[i], COMPACT_MAX);
        if (ev->type == BW_EV_FINALIZE && ev->has_expected)
            snprintf(expected[i], 48, "%" PRIu64 ":%" PRIu64, ev->expected_model_calls,
                     ev->expected_tool_calls);
        a[0] = ev->request_id;
        a[1] = bw_event_dedup_key(ev);
        a[2] = ev->type == BW_EV_MODEL ? "M" : ev->type == BW_EV_TOOL ? "T" : "F";
        a[3] = compact[i];
        a[4] = ev->user_id;
        a[5] = ev->session_id;
        a[6] = ev->org_id;
        a[7] = expected[i];
    }
    r = run_script(st, S_APPLY, nkeys, argc, argv, NULL);
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != n) {
        bw_seterr(err, errsize, "redis apply failed");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        results[i] = (int)r->element[i]->integer;
    rc = 0;
out:
    if (r)
        freeReplyObject(r);
    free(argv);
    free(keys);
    free(compact);
    free(expected);
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

int bw_store_claim_due(bw_store *st, size_t max, char ***rids)
{
    char lease[24], mx[24];
    const char *argv[3];
    redisReply *r;
    char **v;

    *rids = NULL;
    snprintf(lease, sizeof(lease), "%" PRId64, st->timers.lease_ms);
    snprintf(mx, sizeof(mx), "%zu", max);
    argv[0] = DUE_KEY;
    argv[1] = lease;
    argv[2] = mx;
    r = run_script(st, S_CLAIM, 1, 3, argv, NULL);
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        if (r)
            freeReplyObject(r);
        return -1;
    }
    v = calloc(r->elements + 1, sizeof(char *));
    for (size_t i = 0; v && i < r->elements; i++)
        v[i] = strndup(r->element[i]->str, r->element[i]->len);
    *rids = v;
    {
        int n = v ? (int)r->elements : -1;
        freeReplyObject(r);
        return n;
    }
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
    char enc[BW_ENC_ID_MAX + 1], km[KEY_MAX], ke[KEY_MAX], ks[KEY_MAX], lease[24];
    const char *argv[6];
    redisReply *r;
    int rc = -1;

    memset(c, 0, sizeof(*c));
    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    request_key(km, sizeof(km), enc, 'm');
    request_key(ke, sizeof(ke), enc, 'e');
    request_key(ks, sizeof(ks), enc, 's');
    snprintf(lease, sizeof(lease), "%" PRId64, st->timers.lease_ms);
    argv[0] = km;
    argv[1] = ke;
    argv[2] = ks;
    argv[3] = DUE_KEY;
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
    request_key(ks, sizeof(ks), enc, 's');
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
    char enc[BW_ENC_ID_MAX + 1], km[KEY_MAX], ke[KEY_MAX], ks[KEY_MAX], g[16], ret[24], gr[24];
    char field[BW_ENC_ID_MAX + 24];
    const char *argv[12];
    redisReply *r;
    int rc;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    request_key(km, sizeof(km), enc, 'm');
    request_key(ke, sizeof(ke), enc, 'e');
    request_key(ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    snprintf(ret, sizeof(ret), "%" PRId64, st->timers.retention_ms);
    snprintf(gr, sizeof(gr), "%" PRId64, st->timers.finalize_grace_ms);
    snprintf(field, sizeof(field), "%s:%d", enc, gen);
    argv[0] = km;
    argv[1] = ke;
    argv[2] = ks;
    argv[3] = DUE_KEY;
    argv[4] = OUTBOX_KEY;
    argv[5] = OUTBOX_ZKEY;
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
    request_key(km, sizeof(km), enc, 'm');
    request_key(ks, sizeof(ks), enc, 's');
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
    char enc[BW_ENC_ID_MAX + 1], ks[KEY_MAX], g[16], n[24], lease[24];
    const char *argv[6];
    redisReply *r;
    int rc;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    request_key(ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    snprintf(n, sizeof(n), "%lld", attempt);
    snprintf(lease, sizeof(lease), "%" PRId64, st->timers.lease_ms);
    argv[0] = ks;
    argv[1] = DUE_KEY;
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
    char enc[BW_ENC_ID_MAX + 1], km[KEY_MAX], ks[KEY_MAX], g[16], d[24];
    const char *argv[7];
    redisReply *r;

    bw_pct_encode(request_id, strlen(request_id), enc, sizeof(enc));
    request_key(km, sizeof(km), enc, 'm');
    request_key(ks, sizeof(ks), enc, 's');
    snprintf(g, sizeof(g), "%d", gen);
    snprintf(d, sizeof(d), "%" PRId64, delay_ms);
    argv[0] = km;
    argv[1] = ks;
    argv[2] = DUE_KEY;
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
    char age[24], mx[24];
    const char *argv[4] = {OUTBOX_KEY, OUTBOX_ZKEY, age, mx};
    redisReply *r;
    size_t n;

    *fields = *records = NULL;
    snprintf(age, sizeof(age), "%" PRId64, min_age_ms);
    snprintf(mx, sizeof(mx), "%zu", max);
    r = run_script(st, S_OUTBOX_DUE, 2, 4, argv, NULL);
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        if (r)
            freeReplyObject(r);
        return -1;
    }
    n = r->elements / 2;
    *fields = calloc(n + 1, sizeof(char *));
    *records = calloc(n + 1, sizeof(char *));
    for (size_t i = 0; *fields && *records && i < n; i++) {
        (*fields)[i] = strndup(r->element[2 * i]->str, r->element[2 * i]->len);
        (*records)[i] = strndup(r->element[2 * i + 1]->str, r->element[2 * i + 1]->len);
    }
    freeReplyObject(r);
    return (int)n;
}

int bw_store_outbox_done(bw_store *st, const char *field)
{
    redisReply *r;

    if (ensure_connected(st) < 0)
        return -1;
    redisAppendCommand(st->c, "HDEL %s %s", OUTBOX_KEY, field);
    redisAppendCommand(st->c, "ZREM %s %s", OUTBOX_ZKEY, field);
    for (int i = 0; i < 2; i++) {
        if (redisGetReply(st->c, (void **)&r) != REDIS_OK) {
            drop_connection(st);
            return -1;
        }
        freeReplyObject(r);
    }
    return 0;
}

long long bw_store_due_count(bw_store *st)
{
    redisReply *r;
    long long n = -1;

    if (ensure_connected(st) < 0)
        return -1;
    r = redisCommand(st->c, "ZCARD %s", DUE_KEY);
    if (!r) {
        drop_connection(st);
        return -1;
    }
    if (r->type == REDIS_REPLY_INTEGER)
        n = r->integer;
    freeReplyObject(r);
    return n;
}

long long bw_store_overdue_count(bw_store *st)
{
    redisReply *r;
    long long n = -1;
    char now[24];

    if (ensure_connected(st) < 0)
        return -1;
    /* The client clock is close enough for a backpressure threshold. */
    snprintf(now, sizeof(now), "%" PRId64, bw_now_ms());
    r = redisCommand(st->c, "ZCOUNT %s -inf %s", DUE_KEY, now);
    if (!r) {
        drop_connection(st);
        return -1;
    }
    if (r->type == REDIS_REPLY_INTEGER)
        n = r->integer;
    freeReplyObject(r);
    return n;
}

int bw_store_release(bw_store *st, const char *request_id)
{
    redisReply *r;

    if (ensure_connected(st) < 0)
        return -1;
    /* Score 0 is in the past for every clock: due again at once. */
    r = redisCommand(st->c, "ZADD %s XX 0 %s", DUE_KEY, request_id);
    if (!r) {
        drop_connection(st);
        return -1;
    }
    freeReplyObject(r);
    return 0;
}
