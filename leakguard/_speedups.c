/* Optional compiled hot paths of leakguard: without a compiler the pure-Python code does
 * the same, more slowly.  Four jobs:
 *
 * - The socket hook (make_init): the compiled socket.socket.__init__ of _sockets.py.
 *   record(sock) does what registry.record_socket() does for a new socket outside any
 *   integration scope: walk the caller's frames up to the first application frame plus
 *   CONTEXT callers, and store the entry tuple (weakref, created, seq, None, None,
 *   *frames) under the socket's descriptor (registry.Entry: the frames inline, so one
 *   tuple per socket).  It returns False, recording nothing, when an integration scope
 *   is active, so the Python path handles that case.
 * - capture(): stacks.capture, the same frame walk for the integrations' own records.
 * - The kernel scanner (scan): kernel.read_sockets' loop over /proc/self/fd, the state
 *   of each tracked socket from getsockopt(TCP_INFO), with an epoll set so that steady
 *   sockets cost no syscall (see the comment above scan()).
 * - The loops that run once per socket of a snapshot: snapshot.take's join of the kernel's
 *   view with the records (join) and report._socket_dicts' rendering for to_dict (render).
 *
 * Everything else about records lives in registry.py and about kernel state in
 * kernel.py; this file only makes the common cases cheap.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <structmember.h>
#include <time.h>
#include <math.h>

/* CPython 3.11-3.13 keep frames as _PyInterpreterFrame structs and build a frame
 * object for one only when asked (PyEval_GetFrame, PyFrame_GetBack): building and
 * freeing those objects was a large share of a socket's recording cost.  On these
 * versions the walk reads the interpreter frames themselves, through the
 * internal header each version ships; elsewhere (3.10, newer versions) it uses
 * the public frame-object API. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000 && !defined(LEAKGUARD_PUBLIC_FRAMES)
#define LG_IFRAMES 1
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#endif
#ifdef __linux__
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#endif

static PyObject *records;      /* dict: fd -> entry tuple */
static PyObject *app_files;    /* dict: filename -> bool (stacks._app_files, shared) */
static PyObject *is_app_file;  /* stacks.is_app_file, for cache misses */
static long long seq;          /* the last sequence number handed out (registry.mark) */
static PyObject *scope_var;    /* registry._scope ContextVar */
static PyObject *fileno_of;    /* _socket.socket.fileno: no attribute lookup through the subclass */
static PyTypeObject *raw_socket; /* _socket.socket */
static int depth = 48;
static int context = 3;

/* A direct-mapped cache in front of app_files, keyed by the code object's address:
 * the answer for the frames of a hot call site costs a compare, not a dict probe.
 * Each slot holds a reference to its code object, so an address is never reused
 * while cached.  clear_app_cache() empties it when the answers may change
 * (stacks.mark_application). */
#define APP_SLOTS 512
static struct {
    PyObject *code;
    int app;
} app_cache[APP_SLOTS];

static int app_by_filename(PyObject *code);

/* Bumped whenever a stack walk may have run Python code (is_app_file, a code object
 * freed from the cache): what the caller looked up before may have changed. */
static unsigned long ran_python;

/* 1 = application code, 0 = not, -1 = error */
static inline int
app(PyObject *code)
{
    uintptr_t a = (uintptr_t)code;
    size_t h = (size_t)((a >> 4) ^ (a >> 13)) & (APP_SLOTS - 1);
    if (app_cache[h].code == code)
        return app_cache[h].app;
    int r = app_by_filename(code);
    if (r >= 0) {
        PyObject *old = app_cache[h].code;
        app_cache[h].code = Py_NewRef(code);
        app_cache[h].app = r;
        if (old != NULL) {
            ran_python++;
            Py_DECREF(old);
        }
    }
    return r;
}

static PyObject *
clear_app_cache(PyObject *self, PyObject *unused)
{
    for (size_t i = 0; i < APP_SLOTS; i++) {
        PyObject *old = app_cache[i].code;
        app_cache[i].code = NULL;
        Py_XDECREF(old);
    }
    Py_RETURN_NONE;
}

/* Byte offsets as ints, made once and kept: most are above the small-int cache. */
#define OFFSETS 4096
static PyObject *offsets[OFFSETS]; /* offsets[i] = i * 2 */

/* The offset as an int: a borrowed reference, held by the table or, for an offset beyond
 * it, by *fresh* (a list made on first need, released with the walk).  NULL on error. */
static inline PyObject *
offset_obj(long off, PyObject **fresh)
{
    if (off >= 0 && off < 2 * OFFSETS && (off & 1) == 0) {
        PyObject *o = offsets[off >> 1];
        if (o == NULL)
            o = offsets[off >> 1] = PyLong_FromLong(off);
        return o;
    }
    if (*fresh == NULL && (*fresh = PyList_New(0)) == NULL)
        return NULL;
    PyObject *o = PyLong_FromLong(off);
    int rc = o == NULL ? -1 : PyList_Append(*fresh, o);
    Py_XDECREF(o);
    return rc < 0 ? NULL : o;
}

/* Descriptor numbers as ints, made once and kept: the table's keys, above 256 a new int
 * per socket otherwise. */
#define FD_KEYS 4096
static PyObject *fd_keys[FD_KEYS];

static inline PyObject *
fd_key(long fd) /* a new reference */
{
    if (fd >= 0 && fd < FD_KEYS) {
        PyObject *k = fd_keys[fd];
        if (k == NULL)
            k = fd_keys[fd] = PyLong_FromLong(fd);
        return Py_XNewRef(k);
    }
    return PyLong_FromLong(fd);
}

static int
app_by_filename(PyObject *code)
{
    /* By filename: a str caches its hash, a code object recomputes it every time. */
    PyObject *filename = ((PyCodeObject *)code)->co_filename;
    PyObject *r = PyDict_GetItemWithError(app_files, filename);
    if (r != NULL)
        return r == Py_True;
    if (PyErr_Occurred())
        return -1;
    ran_python++;
    r = PyObject_CallOneArg(is_app_file, filename);
    if (r == NULL)
        return -1;
    int out = PyObject_IsTrue(r);
    Py_DECREF(r);
    return out;
}

/* The descriptor of a _socket.socket: PySocketSockObject starts with its SOCKET_T
 * (Modules/socketmodule.h, unchanged since Python 2), an int on POSIX. */
typedef struct {
    PyObject_HEAD
    int sock_fd;
} raw_socket_head;

static inline long
sock_fd(PyObject *sock)
{
#ifdef _WIN32
    PyObject *fdobj = PyObject_CallOneArg(fileno_of, sock);
    if (fdobj == NULL)
        return -1;
    long fd = PyLong_AsLong(fdobj);
    Py_DECREF(fdobj);
    return fd;
#else
    return ((raw_socket_head *)sock)->sock_fd;
#endif
}

#define MAX_DEPTH 1024  /* stack_depth's upper bound (leakguard._config) */

/* A cursor over the calling Python frames, innermost first, skipping frames that
 * have not started (as PyFrame_GetBack does).  frame_code() returns a borrowed
 * reference (the running frame holds its code object for as long as the caller runs),
 * or NULL for a frame that runs no code object. */
#ifdef LG_IFRAMES
typedef _PyInterpreterFrame *frame_t;

static inline frame_t
complete(frame_t f)
{
    while (f != NULL && _PyFrame_IsIncomplete(f))
        f = f->previous;
    return f;
}

static inline frame_t
frame_first(void)
{
    PyThreadState *ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030D0000
    return complete(ts->current_frame);
#else
    return complete(ts->cframe->current_frame);
#endif
}

static inline frame_t
frame_next(frame_t f)
{
    return complete(f->previous);
}

static inline void
frame_done(frame_t f)
{
    (void)f; /* nothing is owned */
}

static inline PyObject *
frame_code(frame_t f)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *code = f->f_executable;
#else
    PyObject *code = (PyObject *)f->f_code;
#endif
    return PyCode_Check(code) ? code : NULL;
}

static inline long
frame_offset(frame_t f) /* the byte offset PyFrame_GetLasti gives */
{
    int lasti = _PyInterpreterFrame_LASTI(f);
    return lasti < 0 ? -1 : lasti * (long)sizeof(_Py_CODEUNIT);
}
#else
typedef PyFrameObject *frame_t; /* owns a reference */

static inline frame_t
frame_first(void)
{
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    return f;
}

static inline frame_t
frame_next(frame_t f)
{
    PyFrameObject *back = PyFrame_GetBack(f);
    Py_DECREF(f);
    return back;
}

static inline void
frame_done(frame_t f)
{
    Py_XDECREF(f);
}

static inline PyObject *
frame_code(frame_t f)
{
    PyObject *code = (PyObject *)PyFrame_GetCode(f);
    Py_XDECREF(code); /* the frame keeps it: borrowed, as on the other path */
    return code;
}

static inline long
frame_offset(frame_t f)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(f);
#else
    return f->f_lasti < 0 ? -1 : f->f_lasti * (long)sizeof(_Py_CODEUNIT);
#endif
}
#endif

/* The stack from the current Python frame's skip-th caller: see stacks.capture.
 * walk() puts (code, offset) pairs into w->buf: a buffer on the C stack for the default
 * depth, so no list grows and nothing is allocated.  They are borrowed references, valid
 * until walk_release: each code object is held by its frame, which runs until the caller
 * returns (garbage collection or other Python code run meanwhile cannot end it), and
 * each offset by the offsets table or w->fresh.  Whoever keeps one takes a reference. */
typedef struct {
    PyObject *small[128];
    PyObject **buf;
    Py_ssize_t n;
    PyObject *fresh; /* offsets beyond the table made for this walk, or NULL */
} walk_t;

static void
walk_release(walk_t *w)
{
    w->n = 0;
    Py_CLEAR(w->fresh);
    if (w->buf != w->small)
        PyMem_Free(w->buf);
    w->buf = w->small;
}

static int
walk(walk_t *w, int skip, int left)
{
    w->buf = w->small;
    w->n = 0;
    w->fresh = NULL;
    if (left > MAX_DEPTH)
        left = MAX_DEPTH;
    if (2 * left > 128) {
        w->buf = PyMem_Malloc(sizeof(PyObject *) * 2 * (size_t)left);
        if (w->buf == NULL) {
            w->buf = w->small;
            PyErr_NoMemory();
            return -1;
        }
    }
    PyObject **buf = w->buf;
    Py_ssize_t n = 0;
    frame_t f = frame_first();
    while (f != NULL && skip-- > 0)
        f = frame_next(f);
    int extra = -1;
    while (f != NULL && left > 0 && extra != 0) {
        PyObject *code = frame_code(f);
        if (code == NULL) {
            f = frame_next(f);
            continue;
        }
        buf[n++] = code;
        PyObject *off = offset_obj(frame_offset(f), &w->fresh);
        if (off == NULL)
            goto error;
        buf[n++] = off;
        left--;
        if (extra < 0) {
            int a = app(code); /* may run Python code: the frames above stay put */
            if (a < 0)
                goto error;
            if (a)
                extra = context;
        }
        else {
            extra--;
        }
        f = frame_next(f);
    }
    frame_done(f);
    w->n = n;
    return 0;
error:
    frame_done(f);
    walk_release(w);
    return -1;
}

/* The walk as a tuple that starts with *head* empty slots for the caller to fill. */
static PyObject *
walk_tuple(walk_t *w, Py_ssize_t head)
{
    PyObject *t = PyTuple_New(head + w->n); /* may collect garbage: w->buf stays valid (see walk_t) */
    if (t != NULL)
        for (Py_ssize_t i = 0; i < w->n; i++)
            PyTuple_SET_ITEM(t, head + i, Py_NewRef(w->buf[i]));
    walk_release(w);
    return t;
}

#define ENTRY_HEAD 5 /* (ref, created, seq, None, None) before the frames: registry.Entry */

/* An entry the compiled hook made: (ref, created, seq, None, None, frames...).  The Python
 * path's (ref, created, seq, frames, scope) has the same size as a compiled entry without
 * frames (a socket made with no Python frame); rewriting it in place would keep its
 * frames and scope for the new socket. */
static inline int
compiled_entry(PyObject *entry)
{
    return PyTuple_GET_ITEM(entry, 3) == Py_None && PyTuple_GET_ITEM(entry, 4) == Py_None;
}

/* In-place reuse of an entry's values, for objects only that entry holds (see record_impl).
 * With write=0 each only answers whether *o* can take *v* in place; with write=1 it also
 * writes it.  0 means the caller must make a new object. */
#ifndef Py_GIL_DISABLED
static inline int
float_reuse(PyObject *o, double v, int write)
{
    if (Py_REFCNT(o) != 1 || !PyFloat_CheckExact(o))
        return 0;
    if (write)
        ((PyFloatObject *)o)->ob_fval = v;
    return 1;
}

/* A positive int keeps its digit count here, so only digits are written: the
 * size/sign word stays valid.  Versions whose layout is not known here make new ints. */
static inline int
long_reuse(PyObject *o, unsigned long long v, int write)
{
    if (Py_REFCNT(o) != 1 || !PyLong_CheckExact(o))
        return 0;
#if PY_VERSION_HEX < 0x030C0000
    Py_ssize_t size = Py_SIZE(o);
    digit *d = ((PyLongObject *)o)->ob_digit;
#elif PY_VERSION_HEX < 0x030E0000
    uintptr_t tag = ((PyLongObject *)o)->long_value.lv_tag;
    if ((tag & 3) != 0) /* the sign bits: 0 is positive */
        return 0;
    Py_ssize_t size = (Py_ssize_t)(tag >> 3);
    digit *d = ((PyLongObject *)o)->long_value.ob_digit;
#else
    return 0;
#endif
    unsigned long long t1 = v >> PyLong_SHIFT, t2 = t1 >> PyLong_SHIFT, t3 = t2 >> PyLong_SHIFT;
    Py_ssize_t need = v == 0 ? 0 : t1 == 0 ? 1 : t2 == 0 ? 2 : t3 == 0 ? 3 : 4;
    if (need != size || need > 3)
        return 0;
    if (write) {
        unsigned long long parts[3] = {v, t1, t2};
        for (Py_ssize_t i = 0; i < need; i++)
            d[i] = (digit)(parts[i] & PyLong_MASK);
    }
    return 1;
}
#endif

/* 1 if an integration scope is active (the Python path records then), 0 if not, -1 error. */
static inline int
scoped(void)
{
    PyObject *sc = NULL;
    if (PyContextVar_Get(scope_var, Py_None, &sc) < 0)
        return -1;
    int r = sc != Py_None;
    Py_DECREF(sc);
    return r;
}

/* The first subclass of _socket.socket seen (socket.socket, mostly), kept for the
 * process's lifetime: the common case's type check is a compare, not an MRO walk. */
static PyTypeObject *raw_sub;

static inline int
is_raw_socket(PyObject *o)
{
    PyTypeObject *tp = Py_TYPE(o);
    if (tp == raw_sub || tp == raw_socket)
        return 1;
    if (!PyType_IsSubtype(tp, raw_socket))
        return 0;
    if (raw_sub == NULL)
        raw_sub = (PyTypeObject *)Py_NewRef((PyObject *)tp);
    return 1;
}

/* The descriptor of a new socket, or -1 (none), or -2 with an exception set. */
static inline long
new_fd(PyObject *sock)
{
    if (is_raw_socket(sock))
        return sock_fd(sock);
    long fd = PyObject_AsFileDescriptor(sock); /* a socket class of another lineage (gevent's): ask it */
    return fd < 0 ? -2 : fd;
}

/* A socket's weak reference, as PyWeakref_NewRef(obj, NULL) makes it.  Where the layout of
 * a weak reference is known (up to 3.13, with the GIL) an entry's weak reference held by
 * nothing but that entry, when the entry is rewritten for the next socket on its
 * descriptor, is kept (drop_ref) instead of freed, and pointed at the next new socket
 * here, linked as the weakref module links a new one: no allocation and no garbage
 * collection per socket.  Nothing else can reach it, so nobody sees it change. */
#if PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED)
#define LG_RELINK 1
static PyObject *spare_ref; /* one dead weak reference, or NULL */
#endif

static inline PyObject *
weak_ref(PyObject *obj)
{
#ifdef LG_RELINK
    PyWeakReference *r = (PyWeakReference *)spare_ref;
    Py_ssize_t off = Py_TYPE(obj)->tp_weaklistoffset;
    if (r != NULL && off > 0 && !PyType_Check(obj)) {
        PyWeakReference **list = (PyWeakReference **)((char *)obj + off);
        if (*list == NULL) { /* nothing refers to it weakly yet: this becomes its first */
            spare_ref = NULL;
            r->wr_object = obj;
            r->hash = -1;
            r->wr_prev = NULL;
            r->wr_next = NULL;
            *list = r;
            return (PyObject *)r;
        }
    }
#endif
    return PyWeakref_NewRef(obj, NULL);
}

/* Release an entry's old weak reference (a reference the caller owned).  When it is the
 * last reference, what freeing it would do to its referent (if that is still alive: a
 * closed socket still bound to a variable) is done here, as weakref_dealloc's
 * clear_weakref does it: unlinked from the referent's list of weak references, then
 * dead (wr_object None); the memory is kept for the next socket. */
static inline void
drop_ref(PyObject *ref)
{
#ifdef LG_RELINK
    if (spare_ref == NULL && Py_REFCNT(ref) == 1 && PyWeakref_CheckRefExact(ref)) {
        PyWeakReference *r = (PyWeakReference *)ref;
        PyObject *obj = r->wr_object;
        if (r->wr_callback == NULL
            && (obj == Py_None || (Py_TYPE(obj)->tp_weaklistoffset > 0 && !PyType_Check(obj)))) {
            if (obj != Py_None) {
                PyWeakReference **list = (PyWeakReference **)((char *)obj + Py_TYPE(obj)->tp_weaklistoffset);
                if (*list == r)
                    *list = r->wr_next;
                if (r->wr_prev != NULL)
                    r->wr_prev->wr_next = r->wr_next;
                if (r->wr_next != NULL)
                    r->wr_next->wr_prev = r->wr_prev;
                r->wr_object = Py_None;
                r->wr_prev = NULL;
                r->wr_next = NULL;
            }
            spare_ref = ref;
            return;
        }
    }
#endif
    Py_DECREF(ref);
}

/* Store a new entry for *sock*, with *ref* its weak reference and *key* its descriptor
 * as an int (both references this steals), *old* the table's entry for that key
 * (borrowed, or NULL), looked up after *ref* was made.  1 or -1. */
static int
store(PyObject *sock, PyObject *key, PyObject *ref, PyObject *old, int skip)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double created = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    unsigned long long n = (unsigned long long)++seq;
    walk_t w;
    unsigned long before = ran_python;
    if (walk(&w, skip, depth) < 0) {
        Py_DECREF(ref);
        Py_DECREF(key);
        return -1;
    }
    if (ran_python != before) { /* is_app_file ran: the table may have changed meanwhile */
        old = PyDict_GetItemWithError(records, key);
        if (old == NULL && PyErr_Occurred()) {
            Py_DECREF(ref);
            Py_DECREF(key);
            walk_release(&w);
            return -1;
        }
    }
    /* The entry (ref, created, seq, None, None, code, offset, code, offset, ...): the
     * frames inline after the five fields (see registry.Entry).
     *
     * A descriptor is mostly reused by the next socket, and its old entry is then
     * referenced by the dict alone (a Record view, a scan or a list of items holds its
     * own reference): when it has the same size, the new values go into it in place, as
     * zip() and enumerate() reuse their result tuple, and so do its time and sequence
     * number when nothing else holds them either, and each frame item that is the same
     * object as before (the same call site: mostly all) stays as it is.  Nothing between
     * the check and the swap can run Python code (the allocations here are not of
     * collected types); the old values are released after, when the entry is whole again. */
#ifndef Py_GIL_DISABLED
    if (old != NULL && Py_REFCNT(old) == 1 && PyTuple_CheckExact(old)
        && PyTuple_GET_SIZE(old) == ENTRY_HEAD + w.n && compiled_entry(old)) {
        PyObject **items = ((PyTupleObject *)old)->ob_item;
        /* New objects where the old ones cannot take the values, before anything changes. */
        int c_here = float_reuse(items[1], created, 0), s_here = long_reuse(items[2], n, 0);
        PyObject *c = c_here ? NULL : PyFloat_FromDouble(created);
        PyObject *s = s_here ? NULL : PyLong_FromUnsignedLongLong(n);
        if ((!c_here && c == NULL) || (!s_here && s == NULL)) {
            Py_XDECREF(c);
            Py_XDECREF(s);
            Py_DECREF(ref);
            Py_DECREF(key);
            walk_release(&w);
            return -1;
        }
        if (c_here)
            float_reuse(items[1], created, 1);
        if (s_here)
            long_reuse(items[2], n, 1);
        Py_DECREF(key);
        PyObject *prev[3] = {items[0], c != NULL ? items[1] : NULL, s != NULL ? items[2] : NULL};
        items[0] = ref;
        if (c != NULL)
            items[1] = c;
        if (s != NULL)
            items[2] = s;
        Py_ssize_t gone = 0; /* the replaced frame items, collected at the front of w.buf */
        if (memcmp(w.buf, items + ENTRY_HEAD, sizeof(PyObject *) * (size_t)w.n) != 0)
            for (Py_ssize_t i = 0; i < w.n; i++) {
                PyObject *v = w.buf[i], *t = items[ENTRY_HEAD + i];
                if (v != t) {
                    items[ENTRY_HEAD + i] = Py_NewRef(v);
                    w.buf[gone++] = t;
                }
            }
        drop_ref(prev[0]);
        Py_XDECREF(prev[1]);
        Py_XDECREF(prev[2]);
        for (Py_ssize_t i = 0; i < gone; i++)
            Py_DECREF(w.buf[i]);
        walk_release(&w);
        return 1;
    }
#endif
    PyObject *entry = walk_tuple(&w, ENTRY_HEAD); /* key is set: a failure returned above */
    if (entry == NULL) {
        Py_DECREF(ref);
        Py_DECREF(key);
        return -1;
    }
    PyTuple_SET_ITEM(entry, 0, ref); /* the new references move into the entry */
    PyTuple_SET_ITEM(entry, 1, PyFloat_FromDouble(created));
    PyTuple_SET_ITEM(entry, 2, PyLong_FromUnsignedLongLong(n));
    PyTuple_SET_ITEM(entry, 3, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(entry, 4, Py_NewRef(Py_None));
    int rc = -1;
    if (PyTuple_GET_ITEM(entry, 1) != NULL && PyTuple_GET_ITEM(entry, 2) != NULL)
        rc = PyDict_SetItem(records, key, entry);
    Py_DECREF(key);
    Py_DECREF(entry);
    return rc < 0 ? -1 : 1;
}


/* The table's entry for *key*, the int *fd* (borrowed), NULL if none, or NULL with an
 * exception set.  A non-negative int's hash is itself (below the hash modulus). */
static inline PyObject *
lookup(PyObject *key, long fd)
{
    return _PyDict_GetItem_KnownHash(records, key, (Py_hash_t)fd);
}

/* What every record starts with: outside a scope, a socket holding a descriptor gets its
 * weak reference (*ref*), its descriptor as an int (*key*, both new references) and the
 * table's entry for it (*old*, borrowed or NULL), looked up after *ref* was made.
 * 2 to go on; else what the caller returns: 1 nothing to record, 0 scoped (the Python
 * path), -1 with an exception set. */
static inline int
begin(PyObject *sock, long *fd, PyObject **ref, PyObject **key, PyObject **old)
{
    int sc = scoped();
    if (sc != 0)
        return sc < 0 ? -1 : 0;
    *fd = new_fd(sock);
    if (*fd < 0)
        return *fd == -2 ? -1 : 1; /* no descriptor: nothing to record */
    *ref = weak_ref(sock);
    if (*ref == NULL)
        return -1;
    *key = fd_key(*fd);
    *old = *key != NULL ? lookup(*key, *fd) : NULL;
    if (*old == NULL && (*key == NULL || PyErr_Occurred())) {
        Py_DECREF(*ref);
        Py_XDECREF(*key);
        return -1;
    }
    return 2;
}

/* record() for a socket created *skip* Python frames below the current one:
 * 1 recorded (or nothing to record), 0 left to the Python path (an integration scope
 * is active), -1 with an exception set. */
static int
record_impl(PyObject *sock, int skip)
{
    long fd;
    PyObject *ref, *key, *old;
    int r = begin(sock, &fd, &ref, &key, &old);
    return r != 2 ? r : store(sock, key, ref, old, skip);
}

/* The object an entry's weak reference points to (a new reference), or NULL (dead, or
 * the entry has no weak reference). */
static inline PyObject *
referent(PyObject *entry)
{
    PyObject *r = PyTuple_GET_ITEM(entry, 0);
    if (!PyWeakref_CheckRefExact(r))
        return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj = NULL;
    if (PyWeakref_GetRef(r, &obj) < 0) {
        PyErr_Clear();
        return NULL;
    }
    return obj;
#else
    PyObject *obj = PyWeakref_GET_OBJECT(r);
    return obj == Py_None ? NULL : Py_NewRef(obj);
#endif
}

static PyObject *views; /* registry._views (fd -> Record view), or NULL: see inherit_impl */

/* record_socket(sock, inherit=True) for a socket built on an existing descriptor
 * (accept(), socket(fileno=...), fromfd(), dup(), ssl's wrap_socket):
 * when another live socket object still holds the descriptor (the plain socket that
 * ssl wraps and then detaches), the new one takes over its record, creation stack and
 * all; otherwise it gets a record of its own, as record_impl gives.  The other socket's
 * descriptor is read from the object itself, never through its fileno() method: a
 * subclass's fileno() may raise, and that must not cost the new socket its record.
 * 1 done, 0 left to the Python path (a scope is active, an owner that is not a socket
 * holds the record, or a Record view of it exists), -1 with an exception set. */
static int
inherit_impl(PyObject *sock)
{
    long fd;
    PyObject *ref, *key, *old;
    int r = begin(sock, &fd, &ref, &key, &old);
    if (r != 2)
        return r;
    PyObject *other = old != NULL && PyTuple_Check(old) && PyTuple_GET_SIZE(old) >= ENTRY_HEAD ? referent(old) : NULL;
    if (other != NULL && other != sock) {
        int holds = is_raw_socket(other) ? sock_fd(other) == fd : -1;
        Py_DECREF(other);
        PyObject *view = holds == 1 && views != NULL ? PyDict_GetItemWithError(views, key) : NULL;
        if (holds < 0 || view != NULL || PyErr_Occurred()) {
            Py_DECREF(ref);
            Py_DECREF(key);
            return PyErr_Occurred() ? -1 : 0;
        }
        if (holds && Py_REFCNT(old) == 1 && PyTuple_CheckExact(old)) {
            /* the handover in place: the table alone holds the entry (no view, no scan), so
             * nobody sees it change; the plain socket's weak reference is kept for the next one */
            PyObject *prev = PyTuple_GET_ITEM(old, 0);
            PyTuple_SET_ITEM(old, 0, ref);
            Py_DECREF(key);
            drop_ref(prev);
            return 1;
        }
        if (holds) { /* the handover: the same entry with the new socket's weak reference */
            Py_ssize_t size = PyTuple_GET_SIZE(old);
            PyObject *entry = PyTuple_New(size);
            if (entry == NULL) {
                Py_DECREF(ref);
                Py_DECREF(key);
                return -1;
            }
            PyTuple_SET_ITEM(entry, 0, ref);
            for (Py_ssize_t i = 1; i < size; i++)
                PyTuple_SET_ITEM(entry, i, Py_NewRef(PyTuple_GET_ITEM(old, i)));
            int rc = PyDict_SetItem(records, key, entry);
            Py_DECREF(entry);
            Py_DECREF(key);
            return rc < 0 ? -1 : 1;
        }
    }
    else {
        Py_XDECREF(other);
    }
    return store(sock, key, ref, old, 0);
}

/* next_seq() -> the next sequence number (registry.mark, and records made in Python). */
static PyObject *
next_seq(PyObject *self, PyObject *unused)
{
    return PyLong_FromLongLong(++seq);
}

static PyObject *
record(PyObject *self, PyObject *sock)
{
    int r = record_impl(sock, 1); /* called from the Python hook: skip its frame */
    return r < 0 ? NULL : PyBool_FromLong(r);
}

/* The compiled socket.socket.__init__ (see _sockets.py, whose Python hook it replaces when
 * this module is built): the original __init__, then the record, with no Python frame of
 * its own.  Recording failures are contained (counted in errors[0]); the original's own
 * exceptions, and BaseExceptions such as KeyboardInterrupt, pass through unchanged. */
static PyObject *hook_orig;   /* the original socket.socket.__init__ */
static PyObject *hook_fast;   /* None: record_impl directly; else a callable standing in for record() */
static PyObject *hook_slow;   /* _sockets._slow(sock, inherit): registry.record_socket */
static PyObject *hook_errors; /* registry._errors, a one-item list */
static PyObject *fileno_str;  /* "fileno", interned */

static int
hook_count_error(void)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1; /* KeyboardInterrupt, SystemExit: not ours to swallow */
    PyErr_Clear();
    if (hook_errors != NULL && PyList_Check(hook_errors) && PyList_GET_SIZE(hook_errors) > 0) {
        long v = PyLong_AsLong(PyList_GET_ITEM(hook_errors, 0));
        PyObject *n = v == -1 && PyErr_Occurred() ? NULL : PyLong_FromLong(v + 1);
        if (n == NULL)
            PyErr_Clear();
        else
            PyList_SetItem(hook_errors, 0, n);
    }
    return 0;
}

/* The hook object: a callable that binds like a Python function (Py_TPFLAGS_METHOD_DESCRIPTOR:
 * slot_tp_init calls it with self first, no bound method made) and carries what introspection
 * reads of the function it replaces: __name__, __qualname__, __module__, __doc__ and
 * __wrapped__ go into its __dict__ (_sockets sets them), so inspect.signature() follows
 * __wrapped__ to the original.  Calls go to the original with their arguments untouched, so
 * every misuse raises the original's own TypeError. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *dict;
} hook_object;

static PyObject *
hook_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *r = PyObject_Vectorcall(hook_orig, args, nargsf, kwnames);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1)
        Py_RETURN_NONE; /* self passed by keyword: nothing is recorded */
    PyObject *self = args[0];
    PyObject *fileno = nargs >= 5 ? args[4] : NULL;
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        /* Keyword names are mostly the interned string itself: a pointer compare. */
        if (name == fileno_str || (PyUnicode_GET_LENGTH(name) == 6 && PyUnicode_CompareWithASCIIString(name, "fileno") == 0))
            fileno = args[nargs + i];
    }
    int inherit = fileno != NULL && fileno != Py_None;
    int done; /* recorded by the fast path */
    if (hook_fast != Py_None) { /* a stand-in for record() (tests): it covers new sockets only */
        PyObject *d = inherit ? Py_NewRef(Py_False) : PyObject_CallOneArg(hook_fast, self);
        done = d == NULL ? -1 : PyObject_IsTrue(d);
        Py_XDECREF(d);
    }
    else {
        done = inherit ? inherit_impl(self) : record_impl(self, 0);
    }
    if (done < 0)
        return hook_count_error() < 0 ? NULL : Py_NewRef(Py_None);
    if (!done) { /* inside an integration scope, or an inherited record the Python path handles */
        PyObject *rr = PyObject_CallFunctionObjArgs(hook_slow, self, inherit ? Py_True : Py_False, NULL);
        if (rr == NULL && hook_count_error() < 0)
            return NULL;
        Py_XDECREF(rr);
    }
    Py_RETURN_NONE;
}

static PyObject *
hook_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static int
hook_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((hook_object *)self)->dict);
    return 0;
}

static int
hook_clear(PyObject *self)
{
    Py_CLEAR(((hook_object *)self)->dict);
    return 0;
}

static void
hook_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(((hook_object *)self)->dict);
    PyObject_GC_Del(self);
}

static PyMemberDef hook_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(hook_object, vectorcall), READONLY, NULL},
    {"__dictoffset__", T_PYSSIZET, offsetof(hook_object, dict), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject hook_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "leakguard._speedups.hook",
    .tp_basicsize = sizeof(hook_object),
    .tp_dealloc = hook_dealloc,
    .tp_vectorcall_offset = offsetof(hook_object, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_traverse = hook_traverse,
    .tp_clear = hook_clear,
    .tp_members = hook_members,
    .tp_descr_get = hook_get,
    .tp_dictoffset = offsetof(hook_object, dict),
};

/* make_init(cls, orig, fast, slow, errors, views=None) -> the hook object to set as
 * cls.__init__; *views* is registry._views (without it, every handover is the Python path's) */
static PyObject *
make_init(PyObject *self, PyObject *args)
{
    PyObject *cls, *orig, *fast, *slow, *errors, *v = NULL;
    if (!PyArg_ParseTuple(args, "O!OOOO!|O!", &PyType_Type, &cls, &orig, &fast, &slow, &PyList_Type, &errors,
                          &PyDict_Type, &v))
        return NULL;
    if (records == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "leakguard._speedups is not configured");
        return NULL;
    }
    Py_XSETREF(hook_orig, Py_NewRef(orig));
    Py_XSETREF(hook_fast, Py_NewRef(fast));
    Py_XSETREF(hook_slow, Py_NewRef(slow));
    Py_XSETREF(hook_errors, Py_NewRef(errors));
    Py_XSETREF(views, Py_XNewRef(v));
    if (PyType_Ready(&hook_type) < 0)
        return NULL;
    if (fileno_str == NULL && (fileno_str = PyUnicode_InternFromString("fileno")) == NULL)
        return NULL;
    hook_object *h = PyObject_GC_New(hook_object, &hook_type);
    if (h == NULL)
        return NULL;
    h->vectorcall = hook_vectorcall;
    h->dict = NULL;
    PyObject_GC_Track((PyObject *)h);
    return (PyObject *)h;
}

static PyObject *
capture(PyObject *self, PyObject *args)
{
    int skip = 1, d = 32;
    if (!PyArg_ParseTuple(args, "|ii", &skip, &d))
        return NULL;
    if (app_files == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "leakguard._speedups is not configured");
        return NULL;
    }
    walk_t w;
    if (walk(&w, skip, d) < 0)
        return NULL;
    return walk_tuple(&w, 0);
}

static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *r, *a, *f, *v;
    long long s;
    int d, c;
    if (!PyArg_ParseTuple(args, "O!O!OLOii", &PyDict_Type, &r, &PyDict_Type, &a, &f, &s, &v, &d, &c))
        return NULL;
    Py_INCREF(r);
    Py_INCREF(a);
    Py_INCREF(f);
    Py_INCREF(v);
    Py_XSETREF(records, r);
    Py_XSETREF(app_files, a);
    Py_XSETREF(is_app_file, f);
    seq = s;
    Py_XSETREF(scope_var, v);
    depth = d;
    context = c;
    Py_RETURN_NONE;
}

static PyObject *
set_depth(PyObject *self, PyObject *arg)
{
    long d = PyLong_AsLong(arg);
    if (d == -1 && PyErr_Occurred())
        return NULL;
    depth = (int)d;
    Py_RETURN_NONE;
}


#ifdef __linux__
/* tcpi_state values whose addresses no longer change: ESTABLISHED, CLOSE_WAIT, LISTEN */
#define STABLE(st) ((st) == 1 || (st) == 8 || (st) == 10)

static PyObject *
kernel_socket(PyTypeObject *kstype, PyObject *key, PyObject *k, PyObject *state, PyObject *obj)
{
    /* As tuple.__new__(kernel_socket, ...) builds it: the subclass's allocator. */
    PyObject *ks = kstype->tp_alloc(kstype, 7);
    if (ks == NULL)
        return NULL;
    PyObject *vals[7] = {key, PyTuple_GET_ITEM(k, 2), PyTuple_GET_ITEM(k, 3), state,
                         PyTuple_GET_ITEM(k, 0), PyTuple_GET_ITEM(k, 1), obj};
    for (int i = 0; i < 7; i++) {
        Py_INCREF(vals[i]);
        PyTuple_SET_ITEM(ks, i, vals[i]);
    }
    return ks;
}

/* The descriptors epoll reports since the last call: a set, or NULL with an exception set. */
static PyObject *
drain(int ep)
{
    PyObject *changed = PySet_New(NULL);
    struct epoll_event evs[256];
    int got;
    do {
        got = epoll_wait(ep, evs, 256, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            Py_XDECREF(changed);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < got && changed != NULL; i++) {
            PyObject *fd = PyLong_FromLong(evs[i].data.fd);
            if (fd == NULL || PySet_Add(changed, fd) < 0)
                Py_CLEAR(changed);
            Py_XDECREF(fd);
        }
    } while (changed != NULL && (got == 256 || got < 0));
    return changed;
}

/* scan(objects, known, kernel_socket, states, last=None, fds=None, ep=-1) -> (items, slow, n, last)
 *
 * kernel.read_sockets' loop over /proc/self/fd (or over the list *fds*; n is
 * how many descriptors were looked at, the directory's own excluded) for the
 * common case: a tracked socket object (objects[fd], still holding fd) whose
 * addresses are known (known[fd] = (local, remote, family, type)) and whose
 * TCP state is ESTABLISHED, CLOSE_WAIT or LISTEN becomes a kernel_socket tuple
 * (fd, family, type, states[state], local, remote, obj) here.  Every other
 * socket descriptor is left to the Python code: its fd goes into items in
 * place (items stay in descriptor order) and its index into slow.
 * Descriptors that are not sockets (fstat) are skipped.
 *
 * The state comes from getsockopt(TCP_INFO), which makes the kernel fill the
 * whole tcp_info under the socket lock: most of a scan's cost.  With *last*
 * (the dict the previous scan returned) and *ep* (an epoll descriptor owned
 * by the caller) a steady socket costs no syscall at all: each candidate is
 * registered once, edge-triggered, for EPOLLRDHUP (EPOLLHUP and EPOLLERR
 * always come along), and keeps last scan's state unless epoll reported it.
 * Every way out of ESTABLISHED, CLOSE_WAIT or LISTEN raises one of those (a
 * FIN from the peer, both directions shut, a reset, an error, the close
 * state), except this process's own shutdown(SHUT_WR) of an ESTABLISHED
 * socket (FIN_WAIT1/2 until the peer answers).  The returned dict maps each
 * candidate registered in *ep* to (known tuple, state); the known tuple's
 * identity ties it to one record, so a socket on a reused descriptor is
 * registered and asked anew.  A registration ends by itself when its
 * socket is closed. */
static PyObject *
scan(PyObject *self, PyObject *args)
{
    PyObject *objects, *known, *kstype, *states, *last = Py_None, *fds = Py_None;
    int ep = -1;
    if (!PyArg_ParseTuple(args, "O!O!O!O!|OOi", &PyDict_Type, &objects, &PyDict_Type, &known, &PyType_Type, &kstype,
                          &PyTuple_Type, &states, &last, &fds, &ep))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)kstype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "scan: kernel_socket must be a tuple subclass");
        return NULL;
    }
    if ((last != Py_None && !PyDict_Check(last)) || (fds != Py_None && !PyList_Check(fds))) {
        PyErr_SetString(PyExc_TypeError, "scan: last must be a dict or None, fds a list or None");
        return NULL;
    }
    int gated = last != Py_None && ep >= 0;
    PyObject *changed = gated ? drain(ep) : NULL;
    if (gated && changed == NULL)
        return NULL;
    DIR *dir = NULL;
    int own = -1;
    Py_ssize_t next_fd = 0, open_fds = 0;
    PyObject *items = PyList_New(0), *slow = PyList_New(0), *next = gated ? PyDict_New() : Py_NewRef(Py_None);
    if (items == NULL || slow == NULL || next == NULL)
        goto error;
    if (fds == Py_None) {
        dir = opendir("/proc/self/fd");
        if (dir == NULL) {
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/proc/self/fd");
            goto error;
        }
        own = dirfd(dir);
    }
    for (;;) {
        long fd;
        if (dir == NULL) { /* the caller's list of descriptors */
            if (next_fd >= PyList_GET_SIZE(fds))
                break;
            fd = PyLong_AsLong(PyList_GET_ITEM(fds, next_fd++));
            if (fd == -1 && PyErr_Occurred())
                goto error;
        }
        else {
            errno = 0;
            struct dirent *de = readdir(dir);
            if (de == NULL) {
                if (errno != 0) {
                    PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/proc/self/fd");
                    goto error;
                }
                break;
            }
            const char *name = de->d_name;
            if (name[0] < '0' || name[0] > '9')
                continue; /* "." and ".." */
            char *end;
            fd = strtol(name, &end, 10);
            if (*end != '\0' || fd == own)
                continue;
        }
        open_fds++;
        PyObject *key = PyLong_FromLong(fd);
        if (key == NULL)
            goto error;
        PyObject *item = key; /* what goes into items: the fd, or a kernel_socket */
        PyObject *obj = PyDict_GetItemWithError(objects, key); /* borrowed */
        PyObject *k = obj != NULL ? PyDict_GetItemWithError(known, key) : NULL;
        if (PyErr_Occurred())
            goto error_key;
        if (k != NULL && PyTuple_Check(k) && PyTuple_GET_SIZE(k) == 4 && PyObject_TypeCheck(obj, raw_socket)) {
            long objfd = sock_fd(obj);
            PyErr_Clear(); /* closed meanwhile (-1): the Python path decides */
            long st = -1;
            PyObject *memo = NULL;
            if (objfd == fd && gated) {
                PyObject *prev = PyDict_GetItemWithError(last, key);
                int same = prev != NULL && PyTuple_Check(prev) && PyTuple_GET_SIZE(prev) == 2
                           && PyTuple_GET_ITEM(prev, 0) == k;
                if (same) {
                    int hit = PySet_Contains(changed, key);
                    if (hit < 0)
                        goto error_key;
                    long pst = PyLong_AsLong(PyTuple_GET_ITEM(prev, 1));
                    if (!hit && STABLE(pst)) {
                        st = pst;
                        memo = Py_NewRef(prev); /* unchanged: carried over as it is */
                    }
                }
                else if (PyErr_Occurred()) {
                    goto error_key;
                }
                else {
                    struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLET, .data.fd = (int)fd};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, (int)fd, &ev) == 0 || errno == EEXIST)
                        same = 1; /* registered now: its next change will be reported */
                }
                if (st < 0 && same) {
                    unsigned char b = 0;
                    socklen_t len = 1;
                    if (getsockopt((int)fd, IPPROTO_TCP, TCP_INFO, &b, &len) == 0 && len >= 1) {
                        st = b;
                        memo = Py_BuildValue("(Ol)", k, st);
                        if (memo == NULL)
                            goto error_key;
                    }
                }
                if (memo != NULL) {
                    int rc = PyDict_SetItem(next, key, memo);
                    Py_DECREF(memo);
                    if (rc < 0)
                        goto error_key;
                }
            }
            else if (objfd == fd) {
                unsigned char b = 0;
                socklen_t len = 1;
                if (getsockopt((int)fd, IPPROTO_TCP, TCP_INFO, &b, &len) == 0 && len >= 1)
                    st = b;
            }
            if (STABLE(st) && st < PyTuple_GET_SIZE(states)) {
                item = kernel_socket((PyTypeObject *)kstype, key, k, PyTuple_GET_ITEM(states, st), obj);
                Py_DECREF(key);
                if (item == NULL)
                    goto error;
            }
        }
        else if (obj == NULL) {
            struct stat sb;
            if (fstat((int)fd, &sb) != 0 || !S_ISSOCK(sb.st_mode)) {
                Py_DECREF(key);
                continue; /* a file, pipe, ... or closed meanwhile */
            }
        }
        if (item == key) { /* left to the Python code */
            PyObject *idx = PyLong_FromSsize_t(PyList_GET_SIZE(items));
            int rc = idx == NULL ? -1 : PyList_Append(slow, idx);
            Py_XDECREF(idx);
            if (rc < 0)
                goto error_key;
        }
        int rc = PyList_Append(items, item);
        Py_DECREF(item);
        if (rc < 0)
            goto error;
        continue;
    error_key:
        Py_DECREF(key);
        goto error;
    }
    if (dir != NULL)
        closedir(dir);
    Py_XDECREF(changed);
    return Py_BuildValue("(NNnN)", items, slow, open_fds, next);
error:
    if (dir != NULL)
        closedir(dir);
    Py_XDECREF(changed);
    Py_XDECREF(items);
    Py_XDECREF(slow);
    Py_XDECREF(next);
    return NULL;
}
#endif

/* Attribute, key and value names of the loops below, interned at their first call. */
static PyObject *s_created, *s_origin, *s_target, *s_addrs, *s_add, *s_unknown, *s_tcp, *s_fd, *s_state, *s_local,
    *s_remote, *s_age, *s_pool, *s_resolved_attr, *s_resolved, *s_to_dict;

static int
intern_names(void)
{
    static const struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_created, "created"}, {&s_origin, "origin"}, {&s_target, "target"}, {&s_addrs, "addrs"}, {&s_add, "add"},
        {&s_unknown, "unknown"}, {&s_tcp, "tcp"}, {&s_fd, "fd"}, {&s_state, "state"}, {&s_local, "local"},
        {&s_remote, "remote"}, {&s_age, "age_s"}, {&s_pool, "pool"}, {&s_resolved_attr, "_resolved"},
        {&s_resolved, "resolved"}, {&s_to_dict, "to_dict"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL)
            return -1;
    return 0;
}

/* join(kernel_socks, records, now, info_cls, names, name_of, always, leak_states, stable, make_batch)
 *   -> (sockets, leaks, counts, ask, batch)
 *
 * snapshot.take's loop, compiled: each KernelSocket (fd, family, type, state, local, remote,
 * obj) joined with its Record (records[fd], or none) into an info_cls tuple (fd, family name,
 * type name, state, local, remote, age, origin, target, record, batch-or-None).  names maps
 * (family, type) to (family name, type name); name_of(family, type) fills it when it lacks
 * them.  A TCP socket in the state *always* is a leak: make_batch() is called at the first,
 * and batch.add(fd, state, record) for each; its info carries the batch and goes into leaks.
 * A TCP socket in another of *leak_states* is left to the caller to judge: its index goes
 * into ask (its info carries None).  counts: TCP sockets by state.  A record whose socket is
 * in a *stable* state gets its addrs (local, remote, family, type) once. */
static PyObject *
join(PyObject *self, PyObject *args)
{
    PyObject *ksocks, *recs, *info_cls, *names, *name_of, *always, *leak_states, *stable, *make_batch;
    double now;
    if (!PyArg_ParseTuple(args, "O!O!dO!O!OOO!O!O", &PyList_Type, &ksocks, &PyDict_Type, &recs, &now, &PyType_Type,
                          &info_cls, &PyDict_Type, &names, &name_of, &always, &PyFrozenSet_Type, &leak_states,
                          &PyFrozenSet_Type, &stable, &make_batch))
        return NULL;
    PyTypeObject *itype = (PyTypeObject *)info_cls;
    if (!PyType_IsSubtype(itype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "join: info_cls must be a tuple subclass");
        return NULL;
    }
    if (intern_names() < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ksocks);
    PyObject *sockets = PyList_New(n), *leaks = PyList_New(0), *counts = PyDict_New(), *ask = PyList_New(0);
    PyObject *batch = NULL, *last_fam = NULL, *last_kind = NULL, *name = NULL; /* name: borrowed from names */
    if (sockets == NULL || leaks == NULL || counts == NULL || ask == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ks = PyList_GET_ITEM(ksocks, i);
        if (!PyTuple_Check(ks) || PyTuple_GET_SIZE(ks) < 7) {
            PyErr_SetString(PyExc_TypeError, "join: kernel sockets must be 7-tuples");
            goto error;
        }
        PyObject *fd = PyTuple_GET_ITEM(ks, 0), *fam = PyTuple_GET_ITEM(ks, 1), *kind = PyTuple_GET_ITEM(ks, 2);
        PyObject *state = PyTuple_GET_ITEM(ks, 3), *obj = PyTuple_GET_ITEM(ks, 6);
        if (name == NULL || fam != last_fam || kind != last_kind) { /* most sockets: the same as the last */
            PyObject *key = PyTuple_Pack(2, fam, kind);
            if (key == NULL)
                goto error;
            name = PyDict_GetItemWithError(names, key);
            Py_DECREF(key);
            if (name == NULL) {
                if (PyErr_Occurred())
                    goto error;
                PyObject *made = PyObject_CallFunctionObjArgs(name_of, fam, kind, NULL);
                if (made == NULL)
                    goto error;
                Py_DECREF(made); /* name_of keeps it in names */
                key = PyTuple_Pack(2, fam, kind);
                name = key == NULL ? NULL : PyDict_GetItemWithError(names, key);
                Py_XDECREF(key);
            }
            if (name == NULL || !PyTuple_Check(name) || PyTuple_GET_SIZE(name) != 2) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "join: names must map (family, type) to two names");
                goto error;
            }
            last_fam = fam, last_kind = kind;
        }
        PyObject *type_name = PyTuple_GET_ITEM(name, 1);
        int tcp = PyObject_RichCompareBool(type_name, s_tcp, Py_EQ);
        if (tcp < 0)
            goto error;
        PyObject *rec = fd == Py_None ? NULL : PyDict_GetItemWithError(recs, fd); /* borrowed */
        if (rec == NULL && PyErr_Occurred())
            goto error;
        PyObject *leak = Py_None;
        if (tcp && state != Py_None) {
            int in = PySet_Contains(leak_states, state);
            int sure = in > 0 ? PyObject_RichCompareBool(state, always, Py_EQ) : 0;
            if (in < 0 || sure < 0)
                goto error;
            if (sure) {
                if (batch == NULL && (batch = PyObject_CallNoArgs(make_batch)) == NULL)
                    goto error;
                PyObject *r = PyObject_CallMethodObjArgs(batch, s_add, fd, state, rec != NULL ? rec : Py_None, NULL);
                if (r == NULL)
                    goto error;
                Py_DECREF(r);
                leak = batch;
            }
            else if (in) {
                PyObject *idx = PyLong_FromSsize_t(i);
                int rc = idx == NULL ? -1 : PyList_Append(ask, idx);
                Py_XDECREF(idx);
                if (rc < 0)
                    goto error;
            }
            PyObject *c = PyDict_GetItemWithError(counts, state);
            if (c == NULL && PyErr_Occurred())
                goto error;
            PyObject *c1 = PyLong_FromLong(c != NULL ? PyLong_AsLong(c) + 1 : 1);
            int rc = c1 == NULL ? -1 : PyDict_SetItem(counts, state, c1);
            Py_XDECREF(c1);
            if (rc < 0)
                goto error;
        }
        PyObject *vals[11] = {fd, PyTuple_GET_ITEM(name, 0), type_name, state, PyTuple_GET_ITEM(ks, 4),
                              PyTuple_GET_ITEM(ks, 5), Py_None, s_unknown, Py_None, Py_None, leak};
        PyObject *age = NULL, *origin = NULL, *target = NULL;
        if (rec != NULL) {
            PyObject *created = PyObject_GetAttr(rec, s_created);
            double c = created == NULL ? -1.0 : PyFloat_AsDouble(created);
            Py_XDECREF(created);
            if (c == -1.0 && PyErr_Occurred())
                goto error;
            age = PyFloat_FromDouble(now - c);
            origin = PyObject_GetAttr(rec, s_origin);
            target = PyObject_GetAttr(rec, s_target);
            if (age == NULL || origin == NULL || target == NULL)
                goto error_rec;
            if (obj != Py_None && state != Py_None) {
                int st = PySet_Contains(stable, state);
                PyObject *addrs = st > 0 ? PyObject_GetAttr(rec, s_addrs) : NULL;
                if (st < 0 || (st > 0 && addrs == NULL))
                    goto error_rec;
                if (addrs == Py_None) {
                    PyObject *t = PyTuple_Pack(4, vals[4], vals[5], fam, kind);
                    int rc = t == NULL ? -1 : PyObject_SetAttr(rec, s_addrs, t);
                    Py_XDECREF(t);
                    if (rc < 0) {
                        Py_DECREF(addrs);
                        goto error_rec;
                    }
                }
                Py_XDECREF(addrs);
            }
            vals[6] = age, vals[7] = origin, vals[8] = target, vals[9] = rec;
        }
        PyObject *info = itype->tp_alloc(itype, 11);
        if (info == NULL)
            goto error_rec;
        for (int k = 0; k < 11; k++)
            PyTuple_SET_ITEM(info, k, Py_NewRef(vals[k]));
        Py_XDECREF(age);
        Py_XDECREF(origin);
        Py_XDECREF(target);
        PyList_SET_ITEM(sockets, i, info);
        if (leak != Py_None && PyList_Append(leaks, info) < 0)
            goto error;
        continue;
    error_rec:
        Py_XDECREF(age);
        Py_XDECREF(origin);
        Py_XDECREF(target);
        goto error;
    }
    return Py_BuildValue("(NNNNN)", sockets, leaks, counts, ask, batch != NULL ? batch : Py_NewRef(Py_None));
error:
    Py_XDECREF(sockets); /* its unfilled slots are NULL, which list_dealloc skips */
    Py_XDECREF(leaks);
    Py_XDECREF(counts);
    Py_XDECREF(ask);
    Py_XDECREF(batch);
    return NULL;
}

/* render(infos, memo, alike, leak_fields, reasons, done) -> list of dicts
 *
 * report._socket_dicts' loop, compiled (its docstring says what each step is for): for each
 * info (fd, family, type, state, local, remote, age, origin, target, record, batch), a copy of
 * the dict sockets alike share (memo[id(stack)] when its family, type, origin and target are
 * the socket's, else alike(memo, stack, family, type, origin, target)) with fd, state, local,
 * remote, age_s (rounded to 3 places as Python's (age * 1000 + 0.5) // 1 / 1000 does) and the
 * pool's to_dict() set; a leak (batch not None) gets leak_fields(d, info, reasons) and goes into
 * done under id(info). */
static PyObject *
render(PyObject *self, PyObject *args)
{
    PyObject *infos, *memo, *alike, *leak_fields, *reasons, *done;
    if (!PyArg_ParseTuple(args, "OO!OOOO!", &infos, &PyDict_Type, &memo, &alike, &leak_fields, &reasons, &PyDict_Type,
                          &done))
        return NULL;
    if (intern_names() < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(infos, "render: infos must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *info = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(info) || PyTuple_GET_SIZE(info) < 11) {
            PyErr_SetString(PyExc_TypeError, "render: each info must be a SocketInfo");
            goto error;
        }
        PyObject *family = PyTuple_GET_ITEM(info, 1), *kind = PyTuple_GET_ITEM(info, 2);
        PyObject *age = PyTuple_GET_ITEM(info, 6), *origin = PyTuple_GET_ITEM(info, 7);
        PyObject *target = PyTuple_GET_ITEM(info, 8), *rec = PyTuple_GET_ITEM(info, 9);
        PyObject *st = Py_NewRef(Py_None), *pool = Py_NewRef(Py_None), *like = NULL, *d = NULL;
        if (rec != Py_None) {
            Py_SETREF(st, PyObject_GetAttr(rec, s_resolved_attr));
            if (st == Py_None)
                Py_SETREF(st, PyObject_CallMethodNoArgs(rec, s_resolved));
            if (st == NULL)
                goto error_item;
            Py_SETREF(pool, PyObject_GetAttr(rec, s_pool));
            if (pool == NULL)
                goto error_item;
        }
        PyObject *id = PyLong_FromVoidPtr(st);
        PyObject *seen = id == NULL ? NULL : PyDict_GetItemWithError(memo, id); /* borrowed */
        Py_XDECREF(id);
        if (seen == NULL && PyErr_Occurred())
            goto error_item;
        if (seen != NULL && PyTuple_Check(seen) && PyTuple_GET_SIZE(seen) == 5) {
            PyObject *want[4] = {family, kind, origin, target};
            int same = 1;
            for (int k = 0; k < 4 && same > 0; k++)
                same = PyObject_RichCompareBool(PyTuple_GET_ITEM(seen, k), want[k], Py_EQ);
            if (same < 0)
                goto error_item;
            if (same)
                like = Py_NewRef(PyTuple_GET_ITEM(seen, 4));
        }
        if (like == NULL) {
            like = PyObject_CallFunctionObjArgs(alike, memo, st, family, kind, origin, target, NULL);
            if (like == NULL)
                goto error_item;
        }
        if (!PyDict_Check(like)) {
            PyErr_SetString(PyExc_TypeError, "render: alike must return a dict");
            goto error_item;
        }
        d = PyDict_Copy(like);
        if (d == NULL || PyDict_SetItem(d, s_fd, PyTuple_GET_ITEM(info, 0)) < 0
            || PyDict_SetItem(d, s_state, PyTuple_GET_ITEM(info, 3)) < 0
            || PyDict_SetItem(d, s_local, PyTuple_GET_ITEM(info, 4)) < 0
            || PyDict_SetItem(d, s_remote, PyTuple_GET_ITEM(info, 5)) < 0)
            goto error_item;
        if (age != Py_None) {
            double a = PyFloat_AsDouble(age);
            if (a == -1.0 && PyErr_Occurred())
                goto error_item;
            PyObject *r = PyFloat_FromDouble(floor(a * 1000.0 + 0.5) / 1000.0); /* what // 1.0 computes */
            int rc = r == NULL ? -1 : PyDict_SetItem(d, s_age, r);
            Py_XDECREF(r);
            if (rc < 0)
                goto error_item;
        }
        if (pool != Py_None) {
            PyObject *pd = PyObject_CallMethodNoArgs(pool, s_to_dict);
            int rc = pd == NULL ? -1 : PyDict_SetItem(d, s_pool, pd);
            Py_XDECREF(pd);
            if (rc < 0)
                goto error_item;
        }
        if (PyTuple_GET_ITEM(info, 10) != Py_None) {
            PyObject *r = PyObject_CallFunctionObjArgs(leak_fields, d, info, reasons, NULL);
            if (r == NULL)
                goto error_item;
            Py_DECREF(r);
            PyObject *key = PyLong_FromVoidPtr(info);
            int rc = key == NULL ? -1 : PyDict_SetItem(done, key, d);
            Py_XDECREF(key);
            if (rc < 0)
                goto error_item;
        }
        Py_DECREF(st);
        Py_DECREF(pool);
        Py_DECREF(like);
        PyList_SET_ITEM(out, i, d);
        continue;
    error_item:
        Py_XDECREF(st);
        Py_XDECREF(pool);
        Py_XDECREF(like);
        Py_XDECREF(d);
        goto error;
    }
    Py_DECREF(seq);
    return out;
error:
    Py_DECREF(seq);
    Py_XDECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"record", record, METH_O, "Record a new socket outside any scope; False if a scope is active."},
    {"clear_app_cache", clear_app_cache, METH_NOARGS, "Forget the cached application-code answers."},
    {"make_init", make_init, METH_VARARGS, "make_init(cls, orig, fast, slow, errors, views=None): the compiled cls.__init__ hook."},
    {"capture", capture, METH_VARARGS, "capture(skip=1, depth=32): stacks.capture, compiled."},
    {"configure", configure, METH_VARARGS,
     "configure(records, app_files, is_app_file, last_seq, scope_var, depth, context)"},
    {"next_seq", next_seq, METH_NOARGS, "next_seq() -> the next sequence number"},
    {"set_depth", set_depth, METH_O, "Set the most frames captured per socket."},
    {"render", render, METH_VARARGS,
     "render(infos, memo, alike, leak_fields, reasons, done): report._socket_dicts' loop, compiled."},
    {"join", join, METH_VARARGS,
     "join(kernel_socks, records, now, info_cls, names, name_of, always, leak_states, stable, make_batch): "
     "snapshot.take's loop, compiled."},
#ifdef __linux__
    {"scan", scan, METH_VARARGS, "scan(objects, known, kernel_socket, states, last=None, fds=None, ep=-1): kernel.read_sockets' loop, compiled."},
#endif
    {NULL, NULL, 0, NULL},
};

/* The module keeps its state in C globals: the hot path reads them with no module-state
 * lookup.  So it runs in the main interpreter only: a sub-interpreter that imported it
 * would rebind those globals to its own objects (the main interpreter's records table,
 * its socket hook's original __init__) and break the main interpreter.  Multi-phase
 * init runs exec_module at every import, also in legacy sub-interpreters (which
 * Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED alone does not refuse); there it raises
 * ImportError, and leakguard in that sub-interpreter takes its pure-Python path
 * (registry._load_speedups), leaving the main interpreter's state alone. */
static int
exec_module(PyObject *mod)
{
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_ImportError,
                        "leakguard._speedups runs in the main interpreter only (its state is process-wide)");
        return -1;
    }
#ifdef Py_GIL_DISABLED
    /* Its globals and in-place entry rewrites rely on the GIL: on a free-threaded build the
     * pure-Python path runs instead, and the GIL is never re-enabled on its account. */
    PyErr_SetString(PyExc_ImportError, "leakguard._speedups is not built for free-threaded Python");
    return -1;
#endif
    if (raw_socket == NULL) {
        PyObject *sm = PyImport_ImportModule("_socket");
        if (sm == NULL)
            return -1;
        PyObject *cls = PyObject_GetAttrString(sm, "socket");
        Py_DECREF(sm);
        if (cls == NULL)
            return -1;
        if (!PyType_Check(cls)) {
            Py_DECREF(cls);
            PyErr_SetString(PyExc_ImportError, "_socket.socket is not a type");
            return -1;
        }
        fileno_of = PyObject_GetAttrString(cls, "fileno"); /* the method descriptor */
        if (fileno_of == NULL) {
            Py_DECREF(cls);
            return -1;
        }
        raw_socket = (PyTypeObject *)cls; /* kept for the process's lifetime */
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)exec_module},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED}, /* true of what runs: exec_module refuses there */
#else
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
#endif
    {0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "leakguard._speedups", NULL, 0, methods, slots};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module);
}
