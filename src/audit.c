/* audit.c: written in a following change */
#include <stdio.h>

#include "bw_audit.h"

int bw_audit_main(const bw_config *cfg, const bw_audit_opts *o)
{
    fprintf(stderr, "billing-worker audit: not available yet\n");
    return 1;
}

int bw_replay_main(const bw_config *cfg, const bw_audit_opts *o)
{
    fprintf(stderr, "billing-worker replay: not available yet\n");
    return 1;
}
