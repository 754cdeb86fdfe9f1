/*
 * bw_worker.h - `billing-worker run`: the consumer loop and the settler,
 * and `billing-worker price`.
 */
#ifndef BW_WORKER_H
#define BW_WORKER_H

#include <stddef.h>

#include "bw_config.h"

typedef struct bw_worker_opts {
    const char *config_path; /* re-read on SIGHUP for the pricing */
    char *const *xprops;     /* -X key=value, applied after kafka.properties */
    size_t n_xprops;
    int shadow; /* --shadow: everything but the charge (records "dry_run") */
} bw_worker_opts;

/**
 * @brief Run until SIGTERM/SIGINT. Takes ownership of cfg->pricing (it may
 *        be replaced on SIGHUP).
 * @returns the process exit code (0 after a clean drain, 1 on a runtime failure).
 */
int bw_worker_run(bw_config *cfg, const bw_worker_opts *opts);

/**
 * @brief `billing-worker price`: JSON-lines events from @p path ("-" or NULL:
 *        stdin) to settlement records (status dry_run) on stdout.
 * @param table 1 for the human-readable table, 0 for one JSON record per line.
 * @returns the exit code.
 */
int bw_price_main(const bw_config *cfg, const char *path, int table);

#endif
