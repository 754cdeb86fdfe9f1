/* worker.c: written in a following change */
