/* publish.c: written in a following change */
