/* pricecmd.c: written in a following change */
