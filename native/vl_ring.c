/* A virtqueue's reader loop (fuse_server/transports/vhost_user.py `Device._reader`).
 *
 * The reader pops chains, answers the ones the native fast path can (vl_serve, on the
 * reader's own thread: handing them to a worker is the wake-up that costs most), pushes
 * those replies and signals the guest, and waits for kicks, all without the interpreter.
 * It returns to Python only for a chain the session must answer, a reply it may not
 * push, a stop, or a broken ring.
 *
 * The queue's mutex (vl_vq.mu) is the Python VirtQueue's lock too: every push, and every
 * change of what a push reads, happens under it, wherever it comes from (replies of the
 * worker pool, lock grants, the ring's stop and start). The reader's state (`busy`,
 * `stopping`, `abandoned`) lives under it as well; the rule is in vhost_user.py's
 * _Reader: a reader asked to stop while it is in a host call is not waited for, and
 * then never touches the ring again (it hands its reply to Python, which parks it). */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vl_native.h"

void *vl_mutex_new(void)
{
    pthread_mutex_t *m = malloc(sizeof(*m));
    if (m)
        pthread_mutex_init(m, NULL);
    return m;
}

void vl_mutex_free(void *m)
{
    if (m) {
        pthread_mutex_destroy(m);
        free(m);
    }
}

void vl_mutex_lock(void *m) { pthread_mutex_lock(m); }
void vl_mutex_unlock(void *m) { pthread_mutex_unlock(m); }

/* Wait for a kick (1) or the stop eventfd (0); -errno if polling fails. */
static int wait_kick(const vl_reader *rd)
{
    struct pollfd p[2] = {{rd->kick_fd, POLLIN, 0}, {rd->stop_fd, POLLIN, 0}};
    uint64_t count;

    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents)
            return 0;
        if (p[0].revents & POLLNVAL)
            return -EBADF;
        /* Non-blocking: a kick someone else consumed leaves nothing to read. */
        if (read(rd->kick_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
            return -errno;
        return 1;
    }
}

int vl_ring_serve(vl_vq *vq, vl_reader *rd, vl_tab *tab, uint8_t *buf, uint64_t cap,
                  vl_seg *segs, uint32_t max_segs, vl_chain *chain, uint8_t *out,
                  uint64_t outcap, uint64_t *reply_len)
{
    *reply_len = 0;
    for (;;) {
        int r = vl_vq_pop(vq, buf, cap, segs, max_segs, chain);
        if (r < 0)
            return r;
        if (r == 0) {
            r = wait_kick(rd);
            if (r <= 0)
                return r == 0 ? VL_RING_STOP : r;
            continue;
        }
        /* Refused chains, requests too short to have a header and rooms too small for
         * one are the session's (it answers them, or the transport an error). */
        if (!tab || chain->error || chain->in_len < 40 || chain->out_len < 16)
            return VL_RING_REQUEST;

        pthread_mutex_lock(vq->mu);
        if (rd->stopping) {
            pthread_mutex_unlock(vq->mu);
            return VL_RING_REQUEST;  /* the pool answers from now on */
        }
        rd->busy = 1;
        pthread_mutex_unlock(vq->mu);

        int64_t n = vl_serve(tab, buf, chain->in_len, out,
                             chain->out_len < outcap ? chain->out_len : outcap);

        pthread_mutex_lock(vq->mu);
        rd->busy = 0;
        if (n == 0) {
            pthread_mutex_unlock(vq->mu);
            return VL_RING_REQUEST;
        }
        if (rd->abandoned || !vq->running) {
            pthread_mutex_unlock(vq->mu);
            *reply_len = (uint64_t)n;
            return VL_RING_UNPUSHED;
        }
        vl_vq_push(vq, chain->head, segs, chain->nsegs, out, (uint64_t)n, 1);
        pthread_mutex_unlock(vq->mu);
    }
}
