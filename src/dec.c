/* dec.c: written in a following change */
