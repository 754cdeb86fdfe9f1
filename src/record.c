/* record.c: written in a following change */
