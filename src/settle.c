/* settle.c: written in a following change */
