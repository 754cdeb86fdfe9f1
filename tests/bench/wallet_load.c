/*
 * wallet_load.c - how many consume calls per second the wallet answers.
 *
 * The benchmark's yardstick for the settlement side: CONCURRENCY threads,
 * each with one keep-alive libcurl easy handle (as the worker's settler
 * threads use), POST the body in BODY_FILE to
 * BASE/api/v1/users/<user>/credits/consume with a unique Idempotency-Key,
 * for SECONDS seconds. Prints one JSON object: requests, errors, seconds,
 * rps, p50_ms, p99_ms, max_ms.
 *
 *   wallet_load BASE CONCURRENCY SECONDS BODY_FILE [KEY_PREFIX]
 *
 * Built by tests/bench/run.sh (cc -O2 -pthread wallet_load.c -lcurl).
 */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_SAMPLES 2000000

static const char *base, *body, *prefix;
static double seconds;
static double *samples;
static long n_samples, n_errors;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t sink(char *p, size_t size, size_t n, void *ud)
{
    (void)p;
    (void)ud;
    return size * n;
}

static void *run(void *arg)
{
    long id = (long)arg;
    CURL *c = curl_easy_init();
    char url[512], key[160];
    double end = now_s() + seconds;
    long i = 0;

    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    while (now_s() < end) {
        struct curl_slist *h = NULL;
        long status = 0;
        double t0 = now_s(), dt;
        CURLcode rc;

        snprintf(url, sizeof(url), "%s/api/v1/users/wl-u-%ld-%ld/credits/consume", base, id,
                 i % 64);
        snprintf(key, sizeof(key), "Idempotency-Key: %s-%ld-%ld", prefix, id, i);
        h = curl_slist_append(h, "Content-Type: application/json");
        h = curl_slist_append(h, "Accept: application/json");
        h = curl_slist_append(h, "Expect:");
        h = curl_slist_append(h, key);
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
        rc = curl_easy_perform(c);
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, NULL);
        curl_slist_free_all(h);
        dt = now_s() - t0;
        pthread_mutex_lock(&mu);
        if (rc != CURLE_OK || status != 200)
            n_errors++;
        if (n_samples < MAX_SAMPLES)
            samples[n_samples++] = dt;
        pthread_mutex_unlock(&mu);
        i++;
    }
    curl_easy_cleanup(c);
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p)
{
    long k = (long)(p * (double)(n_samples - 1) + 0.5);
    return n_samples ? samples[k] * 1000.0 : 0.0;
}

int main(int argc, char **argv)
{
    int conc;
    pthread_t th[256];
    FILE *f;
    static char buf[65536];
    size_t len;
    double t0, el;

    if (argc < 5) {
        fprintf(stderr, "usage: wallet_load BASE CONCURRENCY SECONDS BODY_FILE [KEY_PREFIX]\n");
        return 2;
    }
    base = argv[1];
    conc = atoi(argv[2]);
    seconds = atof(argv[3]);
    prefix = argc > 5 ? argv[5] : "wl";
    if (conc < 1 || conc > 256 || seconds <= 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    if (!(f = fopen(argv[4], "rb"))) {
        perror(argv[4]);
        return 2;
    }
    len = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        len--;
    buf[len] = '\0';
    body = buf;
    samples = malloc(sizeof(double) * MAX_SAMPLES);
    if (!samples)
        return 1;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    t0 = now_s();
    for (long i = 0; i < conc; i++)
        pthread_create(&th[i], NULL, run, (void *)i);
    for (int i = 0; i < conc; i++)
        pthread_join(th[i], NULL);
    el = now_s() - t0;
    qsort(samples, (size_t)n_samples, sizeof(double), cmp);
    printf("{\"concurrency\": %d, \"requests\": %ld, \"errors\": %ld, \"seconds\": %.3f, "
           "\"rps\": %.1f, \"p50_ms\": %.2f, \"p99_ms\": %.2f, \"max_ms\": %.2f}\n",
           conc, n_samples, n_errors, el, (double)n_samples / el, pct(0.50), pct(0.99),
           n_samples ? samples[n_samples - 1] * 1000.0 : 0.0);
    curl_global_cleanup();
    return 0;
}
