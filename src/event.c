/* event.c: written in a following change */
