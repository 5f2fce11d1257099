/*
 * A fake NVIDIA driver library (libnvidia-ml.so.1) for gputel's test suite.
 *
 * NVIDIA's own Python binding (pynvml from nvidia-ml-py) loads this library exactly as it loads
 * the real one (dlopen("libnvidia-ml.so.1") found through LD_LIBRARY_PATH), so every NVML path
 * of gputel runs through the real binding: its struct layouts, its _v2 names, its error classes.
 * Only what is implemented here is exported; a function the binding looks up and this library
 * lacks raises NVMLError_FunctionNotFound, as it does with an older driver.
 *
 * Build:  gcc -shared -fPIC -O1 -Wall -Wextra -Wl,-soname,libnvidia-ml.so.1 \
 *             -o libnvidia-ml.so.1 fake_nvml.c -lpthread
 *
 * THE SCENARIO
 * The world this driver reports is a text file named by FAKE_NVML_SCENARIO, re-read whenever
 * its mtime or size changes (checked on every call), so a test changes the world mid-run by
 * rewriting it (write a temporary file and rename it over the old one). No file, or no
 * variable: a node with zero GPUs. One `key=value` per line; `#` starts a comment line;
 * blanks around keys and values are ignored. Numbers are decimal (or 0x hex).
 *
 *   init.error=N              nvmlInit_v2 and nvmlInitWithFlags return N (9 DRIVER_NOT_LOADED,
 *                             18 LIB_RM_VERSION_MISMATCH, 4 NO_PERMISSION, 999 UNKNOWN ...)
 *   count.error=N             nvmlDeviceGetCount_v2 returns N
 *   device_count=N            number of GPUs (default 0)
 *   driver_version=S          nvmlSystemGetDriverVersion       (default 535.104.05)
 *   nvml_version=S            nvmlSystemGetNVMLVersion         (default 12.535.104.05)
 *   cuda_version=N            nvmlSystemGetCudaDriverVersion(_v2) (default 12020)
 *
 * Per GPU i (0-based), values in NVML's own units:
 *   gpu.i.name=S  gpu.i.uuid=S  gpu.i.pci_bus_id=S    (defaults: "Fake GPU", GPU-fake-000i,
 *                                                      00000000:0i:00.0)
 *   gpu.i.utilization.gpu_pct=N  gpu.i.utilization.memory_pct=N
 *   gpu.i.memory.total_bytes=N  gpu.i.memory.used_bytes=N  gpu.i.memory.free_bytes=N
 *   gpu.i.memory.reserved_bytes=N                     (free defaults to total-used-reserved)
 *   gpu.i.temperature_c=N  gpu.i.power_mw=N  gpu.i.power_limit_mw=N  gpu.i.energy_mj=N
 *   gpu.i.clock.sm_mhz  .mem_mhz  .graphics_mhz  .video_mhz       (nvmlDeviceGetClockInfo)
 *   gpu.i.max_clock.sm_mhz  .mem_mhz  .graphics_mhz  .video_mhz   (nvmlDeviceGetMaxClockInfo)
 *   gpu.i.clock_reasons=N     bitmask for both ...ClocksThrottleReasons and ...ClocksEventReasons
 *   gpu.i.fan_speed_pct=N  gpu.i.pstate=N  gpu.i.pcie.tx_kbps=N  gpu.i.pcie.rx_kbps=N
 *   gpu.i.ecc.corrected=N  gpu.i.ecc.uncorrected=N   (volatile totals; aggregate = same)
 *   gpu.i.field.ID=N          any other nvmlDeviceGetFieldValues field id (unsigned long long)
 *   gpu.i.pcie.counters=1     field values 197/198 (NVML_FI_DEV_PCIE_COUNT_TX/RX_BYTES): byte
 *                             counters growing at pcie.tx_kbps / pcie.rx_kbps (x1024 B/s)
 *   gpu.i.remapped_rows.correctable=N  .uncorrectable=N  .pending=0|1  .failure=0|1
 *                             nvmlDeviceGetRemappedRows (unsupported unless correctable is set)
 *   gpu.i.mig.mode=0|1  gpu.i.mig.pending=0|1  gpu.i.mig.max_count=N
 *   gpu.i.mig.j.gi=N  gpu.i.mig.j.ci=N  gpu.i.mig.j.uuid=S   MIG device j of GPU i exists when
 *                                                            mig.mode=1 and its gi is set
 *   gpu.i.gpm.supported=0|1   nvmlGpmQueryDeviceSupport
 *   gpu.i.gpm.admin_only=1    profiling restricted to admin users, as a driver loaded with
 *                             NVreg_RestrictProfilingToAdminUsers=1 (the default): the support
 *                             query still answers, but GPM samples answer NO_PERMISSION (4) to
 *                             a caller that is not an admin (effective uid 0; `caller.admin=0|1`
 *                             overrides that, for tests that run as root)
 *   gpu.i.gpm.ID=F            GPM metric ID (nvmlGpmMetricId_t) value for the whole GPU
 *   gpu.i.mig.GI.gpm.ID=F     GPM metric ID for GPU instance GI (nvmlGpmMigSampleGet)
 *   gpu.i.mig.j.memory.total_bytes=N  gpu.i.mig.j.memory.used_bytes=N   MIG device j's memory
 *   gpu.i.processes=PID:BYTES:SM[,PID:BYTES:SM...]  compute processes (SM = sm util %, for
 *                             the process-utilization calls; may be left out: PID:BYTES)
 *   gpu.i.graphics_processes=PID:BYTES[,...]
 *   gpu.i.supported_events=N  nvmlDeviceGetSupportedEventTypes (default 0x18f: ECC, pstate,
 *                             Xid, clock, power source)
 * A value that is not set is "not supported": the call returns NVML_ERROR_NOT_SUPPORTED (3).
 *
 * Errors and hangs, per call C of GPU i (C is one of: handle name uuid index pci utilization
 * memory temperature power power_limit energy clock max_clock clock_reasons fan_speed pcie
 * pstate ecc field_values mig_mode mig gpm processes graphics_processes process_utilization
 * events supported_events remapped_rows):
 *   gpu.i.C.error=N           that call returns N (999 UNKNOWN, 4 NO_PERMISSION, ...)
 *   gpu.i.memory_v2.error=N   only nvmlDeviceGetMemoryInfo_v2 fails (a driver without it)
 *   gpu.i.all.error=N         every call on GPU i returns N (15 GPU_IS_LOST), the handle too
 *   gpu.i.C.sleep_ms=N        the call blocks N ms before answering, like a hung driver; it
 *   gpu.i.all.sleep_ms=N      re-reads the scenario while it waits, so lowering or removing the
 *                             key releases a blocked call early
 *
 * Events: `event.ID=GPU,TYPE,DATA` (TYPE an nvmlEventType bitmask bit: 8 Xid, 1/2 ECC; DATA the
 * Xid). nvmlEventSetWait_v2 delivers each listed event once per process (by ID, so appending a
 * new ID delivers one more) to a set registered for that GPU and type, else waits up to its
 * timeout and returns NVML_ERROR_TIMEOUT. `event_wait.sleep_ms=N` blocks every wait N ms first,
 * `event_wait.error=N` makes it fail.
 *
 * Two functions that are not NVML serve tests that load the library into their own process:
 * fakeNvmlCallCount(call, gpu) counts the calls of key `call` that reached GPU `gpu`, and
 * fakeNvmlReset() forgets counts, delivered events and initialisation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    OK = 0, E_UNINITIALIZED = 1, E_INVALID_ARGUMENT = 2, E_NOT_SUPPORTED = 3,
    E_NO_PERMISSION = 4, E_NOT_FOUND = 6, E_INSUFFICIENT_SIZE = 7, E_TIMEOUT = 10,
    E_ARGUMENT_VERSION_MISMATCH = 25,
};

/* ------------------------------------------------------------------ ABI structures */
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned int version; int sensorType; int temperature; } nvmlTemperature_v1_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;
typedef struct {
    unsigned long long timeStamp;
    unsigned int pid, smUtil, memUtil, encUtil, decUtil, jpgUtil, ofaUtil;
} nvmlProcessUtilizationInfo_v1_t;
typedef struct {
    unsigned int version, processSamplesCount;
    unsigned long long lastSeenTimeStamp;
    nvmlProcessUtilizationInfo_v1_t *procUtilArray;
} nvmlProcessesUtilizationInfo_t;
typedef union {
    double dVal; unsigned int uiVal; unsigned long ulVal; unsigned long long ullVal;
    signed long long sllVal; int siVal; unsigned short usVal;
} nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

struct fake_device;
typedef struct fake_device *nvmlDevice_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;
typedef struct { unsigned int version, isSupportedDevice; } nvmlGpmSupport_t;
struct fake_gpm_sample { nvmlDevice_t device; int gpu_instance; unsigned long long taken_ns; };
typedef struct fake_gpm_sample *nvmlGpmSample_t;
typedef struct { char *shortName, *longName, *unit; } nvmlGpmMetricInfo_t;
typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    nvmlGpmMetricInfo_t metricInfo;
} nvmlGpmMetric_t;
typedef struct {
    unsigned int version, numMetrics;
    nvmlGpmSample_t sample1, sample2;
    nvmlGpmMetric_t metrics[]; /* the binding's array length varies: only numMetrics are read */
} nvmlGpmMetricsGet_t;

/* Pinned against the binding's ctypes structures (tests/fakenvml/layouts.py checks the same
 * numbers against the installed pynvml). */
_Static_assert(sizeof(nvmlUtilization_t) == 8, "c_nvmlUtilization_t");
_Static_assert(sizeof(nvmlMemory_t) == 24, "c_nvmlMemory_t");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "c_nvmlMemory_v2_t");
_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t");
_Static_assert(sizeof(nvmlTemperature_v1_t) == 12, "c_nvmlTemperature_v1_t");
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "c_nvmlProcessInfo_v2_t / _v3_t");
_Static_assert(sizeof(nvmlProcessUtilizationSample_t) == 32, "c_nvmlProcessUtilizationSample_t");
_Static_assert(sizeof(nvmlProcessUtilizationInfo_v1_t) == 40, "c_nvmlProcessUtilizationInfo_v1_t");
_Static_assert(sizeof(nvmlProcessesUtilizationInfo_t) == 24, "c_nvmlProcessesUtilizationInfo_v1_t");
_Static_assert(sizeof(nvmlFieldValue_t) == 40, "c_nvmlFieldValue_t");
_Static_assert(sizeof(nvmlEventData_t) == 32, "c_nvmlEventData_t");
_Static_assert(sizeof(nvmlGpmSupport_t) == 8, "c_nvmlGpmSupport_t");
_Static_assert(sizeof(nvmlGpmMetric_t) == 40, "c_nvmlGpmMetric_t");
_Static_assert(sizeof(nvmlGpmMetricsGet_t) == 24, "c_nvmlGpmMetricsGet_t header");

/* ------------------------------------------------------------------ the scenario */
#define MAX_ENTRIES 4096
#define KEY_LEN 96
#define VAL_LEN 512
#define MAX_GPUS 64
#define MAX_MIG 8

struct entry { char key[KEY_LEN]; char val[VAL_LEN]; };
static struct entry entries[MAX_ENTRIES];
static int n_entries;
/* Open-addressing index over `entries` (entry number + 1; 0 = empty), rebuilt on reload: a
 * lookup costs the same with 64 GPUs as with one, as a real driver's answers do. */
#define INDEX_SLOTS (4 * MAX_ENTRIES)
static int key_index[INDEX_SLOTS];

static unsigned int key_hash(const char *key) {
    unsigned int h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)key; *p; p++) h = (h ^ *p) * 16777619u;
    return h;
}

/* The slot of `key`: where it is, or the empty slot where it would go. */
static unsigned int key_slot(const char *key) {
    unsigned int i = key_hash(key) & (INDEX_SLOTS - 1);
    while (key_index[i] != 0 && strcmp(entries[key_index[i] - 1].key, key) != 0)
        i = (i + 1) & (INDEX_SLOTS - 1);
    return i;
}
static struct timespec loaded_mtime;
static off_t loaded_size = -1;
static ino_t loaded_ino;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int init_count;

struct fake_device { int index; int mig; /* -1: the GPU itself, else MIG device number */ };
static struct fake_device gpus[MAX_GPUS];
static struct fake_device migs[MAX_GPUS][MAX_MIG];

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
        *--end = '\0';
    return s;
}

/* Caller holds `lock`. */
static void reload(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    struct stat st;
    if (path == NULL || stat(path, &st) != 0) {
        n_entries = 0;
        loaded_size = -1;
        return;
    }
    if (st.st_size == loaded_size && st.st_ino == loaded_ino &&
        st.st_mtim.tv_sec == loaded_mtime.tv_sec && st.st_mtim.tv_nsec == loaded_mtime.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (f == NULL) return; /* keep the last world: a rename in progress */
    char line[KEY_LEN + VAL_LEN + 8];
    int n = 0;
    while (fgets(line, sizeof line, f) != NULL && n < MAX_ENTRIES) {
        char *s = trim(line);
        if (*s == '#' || *s == '\0') continue;
        char *eq = strchr(s, '=');
        if (eq == NULL) continue;
        *eq = '\0';
        snprintf(entries[n].key, KEY_LEN, "%s", trim(s));
        snprintf(entries[n].val, VAL_LEN, "%s", trim(eq + 1));
        n++;
    }
    fclose(f);
    n_entries = n;
    memset(key_index, 0, sizeof key_index);
    for (int i = 0; i < n; i++) key_index[key_slot(entries[i].key)] = i + 1; /* the last line wins */
    loaded_size = st.st_size;
    loaded_ino = st.st_ino;
    loaded_mtime = st.st_mtim;
}

/* Set for the whole of a device call: the world is checked once as the call starts (and again
 * after each nap of a hang), so the call's lookups skip the stat: one `stat` per call, not one
 * per key, as a real driver answers from memory. Cleared when the call returns (ENTER's
 * cleanup). */
static __thread int pinned;

static void unpin(int *unused) {
    (void)unused;
    pinned = 0;
}

/* Re-reads the scenario if it changed and pins it for the rest of the call. */
static void pin_world(void) {
    pthread_mutex_lock(&lock);
    reload();
    pthread_mutex_unlock(&lock);
    pinned = 1;
}

/* Copies the value of `key` into out (VAL_LEN); 1 when set. */
static int lookup(const char *key, char *out) {
    int found = 0;
    pthread_mutex_lock(&lock);
    if (!pinned) reload();
    int i = n_entries > 0 ? key_index[key_slot(key)] : 0;
    if (i != 0) {
        memcpy(out, entries[i - 1].val, strlen(entries[i - 1].val) + 1);
        found = 1;
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static int get_str(char *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int get_str(char *out, const char *fmt, ...) {
    char key[KEY_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    return lookup(key, out);
}

static int get_num(unsigned long long *out, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int get_num(unsigned long long *out, const char *fmt, ...) {
    char key[KEY_LEN], val[VAL_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    if (!lookup(key, val)) return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(val, &end, 0);
    if (errno != 0 || end == val) return 0;
    *out = v;
    return 1;
}

static int get_double(double *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int get_double(double *out, const char *fmt, ...) {
    char key[KEY_LEN], val[VAL_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    if (!lookup(key, val)) return 0;
    char *end;
    double v = strtod(val, &end);
    if (end == val) return 0;
    *out = v;
    return 1;
}

static void n_delivered_reset(void);

static unsigned long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000ull + (unsigned long long)ts.tv_nsec / 1000000ull;
}

static void nap_ms(unsigned long long ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* Blocks while `gpu.i.call.sleep_ms` or `gpu.i.all.sleep_ms` (re-read as it waits) says so. */
static void hang(int index, const char *call) {
    unsigned long long start = now_ms();
    for (;;) {
        unsigned long long a = 0, b = 0;
        get_num(&a, "gpu.%d.%s.sleep_ms", index, call);
        get_num(&b, "gpu.%d.all.sleep_ms", index);
        unsigned long long want = a > b ? a : b;
        unsigned long long waited = now_ms() - start;
        if (waited >= want) return;
        nap_ms(want - waited < 20 ? want - waited : 20);
        pin_world(); /* the key may have gone while we slept */
    }
}

/* Calls per (call key, GPU), for tests that count driver round-trips (fakeNvmlCallCount). */
#define MAX_CALL_KEYS 64
static const char *call_keys[MAX_CALL_KEYS];
static unsigned long call_counts[MAX_CALL_KEYS][MAX_GPUS];

static void count_call(int index, const char *call) {
    if (index < 0 || index >= MAX_GPUS) return;
    pthread_mutex_lock(&lock);
    for (int k = 0; k < MAX_CALL_KEYS; k++) {
        if (call_keys[k] == NULL) call_keys[k] = call;
        if (call_keys[k] == call || strcmp(call_keys[k], call) == 0) {
            call_counts[k][index]++;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
}

/* Not NVML: how many times call key `call` reached GPU `index` (tests load it with ctypes). */
unsigned long fakeNvmlCallCount(const char *call, int index) {
    unsigned long n = 0;
    pthread_mutex_lock(&lock);
    for (int k = 0; k < MAX_CALL_KEYS && call_keys[k] != NULL; k++)
        if (strcmp(call_keys[k], call) == 0 && index >= 0 && index < MAX_GPUS)
            n = call_counts[k][index];
    pthread_mutex_unlock(&lock);
    return n;
}

/* Not NVML: forget the counts and the delivered events (a new test in the same process). */
void fakeNvmlReset(void) {
    pthread_mutex_lock(&lock);
    memset(call_counts, 0, sizeof call_counts);
    init_count = 0;
    n_delivered_reset();
    loaded_size = -1;
    pthread_mutex_unlock(&lock);
}

/* Every device call starts here: the hang, then the scripted error, if any. The caller unpins
 * when it returns (ENTER, or its own cleanup variable). */
static nvmlReturn_t enter_gpu(int index, const char *call) {
    if (init_count <= 0) return E_UNINITIALIZED;
    if (!pinned) pin_world();
    count_call(index, call);
    hang(index, call);
    unsigned long long code;
    if (get_num(&code, "gpu.%d.all.error", index)) return (nvmlReturn_t)code;
    if (get_num(&code, "gpu.%d.%s.error", index, call)) return (nvmlReturn_t)code;
    return OK;
}

static int device_count(void) {
    unsigned long long n = 0;
    get_num(&n, "device_count");
    return n > MAX_GPUS ? MAX_GPUS : (int)n;
}

static int valid(nvmlDevice_t d) {
    if (d == NULL) return 0;
    if (d >= &gpus[0] && d < &gpus[MAX_GPUS]) return (int)(d - gpus) < device_count();
    if (d >= &migs[0][0] && d < &migs[MAX_GPUS][0])
        return (int)((d - &migs[0][0]) / MAX_MIG) < device_count();
    return 0;
}

/* The GPU call prologue: a valid handle, then enter_gpu. */
#define ENTER(dev, call)                                   \
    int pin_ __attribute__((cleanup(unpin))) = 0;          \
    (void)pin_;                                            \
    do {                                                   \
        if (init_count <= 0) return E_UNINITIALIZED;       \
        pin_world();                                       \
        if (!valid(dev)) return E_INVALID_ARGUMENT;        \
        nvmlReturn_t rc_ = enter_gpu((dev)->index, call);  \
        if (rc_ != OK) return rc_;                         \
    } while (0)

#define NUM_OR_UNSUPPORTED(var, ...)                                \
    do {                                                            \
        if (!get_num(&(var), __VA_ARGS__)) return E_NOT_SUPPORTED;  \
    } while (0)

static nvmlReturn_t copy_string(const char *value, char *buf, unsigned int length) {
    if (buf == NULL) return E_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return E_INSUFFICIENT_SIZE;
    memcpy(buf, value, strlen(value) + 1);
    return OK;
}

/* ------------------------------------------------------------------ library */
static const char *error_names[] = {
    [0] = "Success", [1] = "Uninitialized", [2] = "Invalid Argument", [3] = "Not Supported",
    [4] = "Insufficient Permissions", [5] = "Already Initialized", [6] = "Not Found",
    [7] = "Insufficient Size", [8] = "Insufficient External Power", [9] = "Driver Not Loaded",
    [10] = "Timeout", [11] = "Interrupt request issue", [12] = "NVML Shared Library Not Found",
    [13] = "Function Not Found", [14] = "Corrupted infoROM", [15] = "GPU is lost",
    [16] = "GPU requires restart", [17] = "The operating system has blocked the request.",
    [18] = "RM has detected an NVML/RM version mismatch.", [19] = "In use by another client",
    [20] = "Insufficient Memory", [21] = "No data", [25] = "Argument version mismatch",
};

const char *nvmlErrorString(nvmlReturn_t result) {
    if (result >= 0 && (size_t)result < sizeof error_names / sizeof *error_names &&
        error_names[result] != NULL)
        return error_names[result];
    return "Unknown Error";
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    unsigned long long code;
    if (get_num(&code, "init.error")) return (nvmlReturn_t)code;
    pthread_mutex_lock(&lock);
    init_count++;
    pthread_mutex_unlock(&lock);
    return OK;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = init_count > 0 ? OK : E_UNINITIALIZED;
    if (init_count > 0) init_count--;
    pthread_mutex_unlock(&lock);
    return rc;
}

static nvmlReturn_t system_string(const char *key, const char *fallback, char *buf,
                                  unsigned int length) {
    if (init_count <= 0) return E_UNINITIALIZED;
    char val[VAL_LEN];
    return copy_string(lookup(key, val) ? val : fallback, buf, length);
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    return system_string("driver_version", "535.104.05", version, length);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    return system_string("nvml_version", "12.535.104.05", version, length);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    if (init_count <= 0) return E_UNINITIALIZED;
    unsigned long long v = 12020;
    get_num(&v, "cuda_version");
    *version = (int)v;
    return OK;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    return nvmlSystemGetCudaDriverVersion(version);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (init_count <= 0) return E_UNINITIALIZED;
    unsigned long long code;
    if (get_num(&code, "count.error")) return (nvmlReturn_t)code;
    *count = (unsigned int)device_count();
    return OK;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (init_count <= 0) return E_UNINITIALIZED;
    if (device == NULL || index >= (unsigned int)device_count()) return E_INVALID_ARGUMENT;
    int pin_ __attribute__((cleanup(unpin))) = 0;
    (void)pin_;
    nvmlReturn_t rc = enter_gpu((int)index, "handle");
    if (rc != OK) return rc;
    gpus[index].index = (int)index;
    gpus[index].mig = -1;
    *device = &gpus[index];
    return OK;
}

/* ------------------------------------------------------------------ identity */
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    ENTER(d, "name");
    char val[VAL_LEN];
    if (!get_str(val, "gpu.%d.name", d->index)) snprintf(val, VAL_LEN, "Fake GPU");
    return copy_string(val, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    ENTER(d, "uuid");
    char val[VAL_LEN];
    if (d->mig >= 0) {
        if (!get_str(val, "gpu.%d.mig.%d.uuid", d->index, d->mig))
            snprintf(val, VAL_LEN, "MIG-fake-%04d-%d", d->index, d->mig);
    } else if (!get_str(val, "gpu.%d.uuid", d->index)) {
        snprintf(val, VAL_LEN, "GPU-fake-%04d", d->index);
    }
    return copy_string(val, uuid, length);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *index) {
    ENTER(d, "index");
    *index = (unsigned int)d->index;
    return OK;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci) {
    ENTER(d, "pci");
    char val[VAL_LEN];
    if (!get_str(val, "gpu.%d.pci_bus_id", d->index))
        snprintf(val, VAL_LEN, "00000000:%02X:00.0", d->index + 1);
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busId, sizeof pci->busId, "%.31s", val);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%.15s", val + (strlen(val) > 12 ? 4 : 0));
    unsigned int domain = 0, bus = 0, device = 0;
    if (sscanf(val, "%x:%x:%x", &domain, &bus, &device) == 3) {
        pci->domain = domain;
        pci->bus = bus;
        pci->device = device;
    }
    pci->pciDeviceId = 0x233010de;
    return OK;
}

/* ------------------------------------------------------------------ readings */
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    ENTER(d, "utilization");
    unsigned long long gpu, mem = 0;
    NUM_OR_UNSUPPORTED(gpu, "gpu.%d.utilization.gpu_pct", d->index);
    get_num(&mem, "gpu.%d.utilization.memory_pct", d->index);
    u->gpu = (unsigned int)gpu;
    u->memory = (unsigned int)mem;
    return OK;
}

static nvmlReturn_t memory_values(nvmlDevice_t d, unsigned long long *total,
                                  unsigned long long *used, unsigned long long *free_,
                                  unsigned long long *reserved) {
    ENTER(d, "memory");
    *used = 0;
    *reserved = 0;
    if (d->mig >= 0) { /* a MIG device: its own memory slice */
        NUM_OR_UNSUPPORTED(*total, "gpu.%d.mig.%d.memory.total_bytes", d->index, d->mig);
        get_num(used, "gpu.%d.mig.%d.memory.used_bytes", d->index, d->mig);
        *free_ = *total > *used ? *total - *used : 0;
        return OK;
    }
    NUM_OR_UNSUPPORTED(*total, "gpu.%d.memory.total_bytes", d->index);
    get_num(used, "gpu.%d.memory.used_bytes", d->index);
    get_num(reserved, "gpu.%d.memory.reserved_bytes", d->index);
    if (!get_num(free_, "gpu.%d.memory.free_bytes", d->index))
        *free_ = *total > *used + *reserved ? *total - *used - *reserved : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    unsigned long long total, used, free_, reserved;
    nvmlReturn_t rc = memory_values(d, &total, &used, &free_, &reserved);
    if (rc != OK) return rc;
    m->total = total;
    m->used = used + reserved; /* v1 counts the driver's reservation as used */
    m->free = free_;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    if (m == NULL || m->version != ((unsigned int)sizeof(nvmlMemory_v2_t) | (2u << 24)))
        return E_ARGUMENT_VERSION_MISMATCH;
    unsigned long long total, used, free_, reserved, code;
    if (valid(d) && get_num(&code, "gpu.%d.memory_v2.error", d->index)) /* an older driver */
        return (nvmlReturn_t)code;
    nvmlReturn_t rc = memory_values(d, &total, &used, &free_, &reserved);
    if (rc != OK) return rc;
    m->total = total;
    m->used = used;
    m->free = free_;
    m->reserved = reserved;
    return OK;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *temp) {
    ENTER(d, "temperature");
    if (sensor != 0) return E_INVALID_ARGUMENT;
    unsigned long long t;
    NUM_OR_UNSUPPORTED(t, "gpu.%d.temperature_c", d->index);
    *temp = (unsigned int)t;
    return OK;
}

nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t d, nvmlTemperature_v1_t *temp) {
    if (temp == NULL || temp->version != ((unsigned int)sizeof *temp | (1u << 24)))
        return E_ARGUMENT_VERSION_MISMATCH;
    unsigned int value;
    nvmlReturn_t rc = nvmlDeviceGetTemperature(d, temp->sensorType, &value);
    if (rc == OK) temp->temperature = (int)value;
    return rc;
}

#define UINT_GETTER(fn, call, key)                                    \
    nvmlReturn_t fn(nvmlDevice_t d, unsigned int *out) {              \
        ENTER(d, call);                                               \
        unsigned long long v;                                         \
        NUM_OR_UNSUPPORTED(v, "gpu.%d." key, d->index);               \
        *out = (unsigned int)v;                                       \
        return OK;                                                    \
    }

UINT_GETTER(nvmlDeviceGetPowerUsage, "power", "power_mw")
UINT_GETTER(nvmlDeviceGetEnforcedPowerLimit, "power_limit", "power_limit_mw")
UINT_GETTER(nvmlDeviceGetFanSpeed, "fan_speed", "fan_speed_pct")

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
    ENTER(d, "energy");
    NUM_OR_UNSUPPORTED(*mj, "gpu.%d.energy_mj", d->index);
    return OK;
}

nvmlReturn_t nvmlDeviceGetPerformanceState(nvmlDevice_t d, int *pstate) {
    ENTER(d, "pstate");
    unsigned long long v;
    NUM_OR_UNSUPPORTED(v, "gpu.%d.pstate", d->index);
    *pstate = (int)v;
    return OK;
}

static const char *clock_names[] = {"graphics", "sm", "mem", "video"};

static nvmlReturn_t clock_value(nvmlDevice_t d, const char *call, const char *prefix, int type,
                                unsigned int *mhz) {
    ENTER(d, call);
    if (type < 0 || type > 3) return E_INVALID_ARGUMENT;
    unsigned long long v;
    NUM_OR_UNSUPPORTED(v, "gpu.%d.%s.%s_mhz", d->index, prefix, clock_names[type]);
    *mhz = (unsigned int)v;
    return OK;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *mhz) {
    return clock_value(d, "clock", "clock", type, mhz);
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t d, int type, unsigned int *mhz) {
    return clock_value(d, "max_clock", "max_clock", type, mhz);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *r) {
    ENTER(d, "clock_reasons");
    NUM_OR_UNSUPPORTED(*r, "gpu.%d.clock_reasons", d->index);
    return OK;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *r) {
    return nvmlDeviceGetCurrentClocksEventReasons(d, r);
}

nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned int *kbps) {
    ENTER(d, "pcie");
    if (counter != 0 && counter != 1) return E_INVALID_ARGUMENT;
    unsigned long long v;
    NUM_OR_UNSUPPORTED(v, "gpu.%d.pcie.%s_kbps", d->index, counter == 0 ? "tx" : "rx");
    *kbps = (unsigned int)v;
    return OK;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int error_type, int counter_type,
                                         unsigned long long *count) {
    ENTER(d, "ecc");
    (void)counter_type;
    if (error_type != 0 && error_type != 1) return E_INVALID_ARGUMENT;
    NUM_OR_UNSUPPORTED(*count, "gpu.%d.ecc.%s", d->index,
                       error_type == 0 ? "corrected" : "uncorrected");
    return OK;
}

/* Field ids with a scenario key of their own: ECC totals (volatile) and the energy counter. */
static nvmlReturn_t field_value(int index, unsigned int id, unsigned long long *v,
                                unsigned long long t_ms) {
    const char *call = NULL, *key = NULL;
    if (id == 3) { call = "ecc"; key = "ecc.corrected"; }
    else if (id == 4) { call = "ecc"; key = "ecc.uncorrected"; }
    else if (id == 83) { call = "energy"; key = "energy_mj"; }
    unsigned long long code, on = 0, kbps = 0;
    if ((id == 197 || id == 198) && get_num(&on, "gpu.%d.pcie.counters", index) && on) {
        /* PCIe byte counters that grow at the scenario's throughput (KB/s of 1024 bytes). */
        if (get_num(&code, "gpu.%d.field.%u.error", index, id)) return (nvmlReturn_t)code;
        if (!get_num(&kbps, "gpu.%d.pcie.%s_kbps", index, id == 197 ? "tx" : "rx"))
            return E_NOT_SUPPORTED;
        *v = kbps * 1024ull * t_ms / 1000ull;
        return OK;
    }
    if (call != NULL) {
        if (get_num(&code, "gpu.%d.%s.error", index, call)) return (nvmlReturn_t)code;
        return get_num(v, "gpu.%d.%s", index, key) ? OK : E_NOT_SUPPORTED;
    }
    if (get_num(&code, "gpu.%d.field.%u.error", index, id)) return (nvmlReturn_t)code;
    return get_num(v, "gpu.%d.field.%u", index, id) ? OK : E_NOT_SUPPORTED;
}

nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t d, int count, nvmlFieldValue_t *values) {
    ENTER(d, "field_values");
    if (count < 0 || (count > 0 && values == NULL)) return E_INVALID_ARGUMENT;
    unsigned long long t_ms = now_ms();
    for (int i = 0; i < count; i++) {
        unsigned long long v = 0;
        values[i].timestamp = (long long)t_ms * 1000;
        values[i].latencyUsec = 0;
        values[i].valueType = 3; /* NVML_VALUE_TYPE_UNSIGNED_LONG_LONG */
        values[i].nvmlReturn = field_value(d->index, values[i].fieldId, &v, t_ms);
        values[i].value.ullVal = values[i].nvmlReturn == OK ? v : 0;
    }
    return OK;
}

/* Row remapping (Ampere and newer): gpu.i.remapped_rows.{correctable,uncorrectable,pending,
 * failure}; not supported unless `correctable` is set, the others default to 0. */
nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned int *corr, unsigned int *unc,
                                       unsigned int *pending, unsigned int *failure) {
    ENTER(d, "remapped_rows");
    if (corr == NULL || unc == NULL || pending == NULL || failure == NULL)
        return E_INVALID_ARGUMENT;
    unsigned long long c, u = 0, p = 0, f = 0;
    NUM_OR_UNSUPPORTED(c, "gpu.%d.remapped_rows.correctable", d->index);
    get_num(&u, "gpu.%d.remapped_rows.uncorrectable", d->index);
    get_num(&p, "gpu.%d.remapped_rows.pending", d->index);
    get_num(&f, "gpu.%d.remapped_rows.failure", d->index);
    *corr = (unsigned int)c;
    *unc = (unsigned int)u;
    *pending = (unsigned int)p;
    *failure = (unsigned int)f;
    return OK;
}

/* ------------------------------------------------------------------ MIG */
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *current, unsigned int *pending) {
    ENTER(d, "mig_mode");
    unsigned long long mode, pend;
    NUM_OR_UNSUPPORTED(mode, "gpu.%d.mig.mode", d->index);
    if (!get_num(&pend, "gpu.%d.mig.pending", d->index)) pend = mode;
    *current = (unsigned int)mode;
    *pending = (unsigned int)pend;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned int *count) {
    ENTER(d, "mig");
    unsigned long long n;
    NUM_OR_UNSUPPORTED(n, "gpu.%d.mig.max_count", d->index);
    *count = (unsigned int)(n > MAX_MIG ? MAX_MIG : n);
    return OK;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned int index,
                                                 nvmlDevice_t *mig) {
    ENTER(d, "mig");
    if (d->mig >= 0 || index >= MAX_MIG) return E_INVALID_ARGUMENT;
    unsigned long long mode = 0, gi;
    get_num(&mode, "gpu.%d.mig.mode", d->index);
    if (mode != 1) return E_NOT_SUPPORTED;
    if (!get_num(&gi, "gpu.%d.mig.%u.gi", d->index, index)) return E_NOT_FOUND;
    migs[d->index][index].index = d->index;
    migs[d->index][index].mig = (int)index;
    *mig = &migs[d->index][index];
    return OK;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t mig, nvmlDevice_t *d) {
    ENTER(mig, "mig");
    if (mig->mig < 0) return E_INVALID_ARGUMENT;
    *d = &gpus[mig->index];
    return OK;
}

static nvmlReturn_t instance_id(nvmlDevice_t d, const char *which, unsigned int *id) {
    ENTER(d, "mig");
    if (d->mig < 0) return E_NOT_SUPPORTED;
    unsigned long long v;
    if (!get_num(&v, "gpu.%d.mig.%d.%s", d->index, d->mig, which)) return E_NOT_FOUND;
    *id = (unsigned int)v;
    return OK;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t d, unsigned int *id) {
    return instance_id(d, "gi", id);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t d, unsigned int *id) {
    return instance_id(d, "ci", id);
}

/* ------------------------------------------------------------------ processes */
struct proc { unsigned int pid; unsigned long long bytes; unsigned int sm; };

/* Parses PID:BYTES[:SM],...; returns how many (at most max). */
static int parse_procs(const char *text, struct proc *out, int max) {
    int n = 0;
    const char *p = text;
    while (*p != '\0' && n < max) {
        unsigned int pid = 0, sm = 0;
        unsigned long long bytes = 0;
        int fields = sscanf(p, "%u:%llu:%u", &pid, &bytes, &sm);
        if (fields >= 2) {
            out[n].pid = pid;
            out[n].bytes = bytes;
            out[n].sm = fields == 3 ? sm : 0;
            n++;
        }
        const char *comma = strchr(p, ',');
        if (comma == NULL) break;
        p = comma + 1;
    }
    return n;
}

#define MAX_PROCS 256

static nvmlReturn_t running(nvmlDevice_t d, const char *call, unsigned int *count,
                            nvmlProcessInfo_t *infos) {
    ENTER(d, call);
    if (count == NULL) return E_INVALID_ARGUMENT;
    char val[VAL_LEN];
    struct proc procs[MAX_PROCS];
    int n = get_str(val, "gpu.%d.%s", d->index, call) ? parse_procs(val, procs, MAX_PROCS) : 0;
    if (infos == NULL || *count < (unsigned int)n) {
        *count = (unsigned int)n;
        return n == 0 ? OK : E_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) {
        infos[i].pid = procs[i].pid;
        infos[i].usedGpuMemory = procs[i].bytes;
        infos[i].gpuInstanceId = 0xFFFFFFFFu;
        infos[i].computeInstanceId = 0xFFFFFFFFu;
    }
    *count = (unsigned int)n;
    return OK;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    return running(d, "processes", count, infos);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    return running(d, "processes", count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
    return running(d, "graphics_processes", count, infos);
}

static int utilization_procs(nvmlDevice_t d, struct proc *procs) {
    char val[VAL_LEN];
    return get_str(val, "gpu.%d.processes", d->index) ? parse_procs(val, procs, MAX_PROCS) : 0;
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d,
                                             nvmlProcessUtilizationSample_t *samples,
                                             unsigned int *count, unsigned long long last_seen) {
    ENTER(d, "process_utilization");
    (void)last_seen;
    if (count == NULL) return E_INVALID_ARGUMENT;
    struct proc procs[MAX_PROCS];
    int n = utilization_procs(d, procs);
    if (n == 0) return E_NOT_FOUND; /* what the driver says when no process ran */
    if (samples == NULL || *count < (unsigned int)n) {
        *count = (unsigned int)n;
        return E_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) {
        memset(&samples[i], 0, sizeof samples[i]);
        samples[i].pid = procs[i].pid;
        samples[i].timeStamp = now_ms() * 1000ull;
        samples[i].smUtil = procs[i].sm;
    }
    *count = (unsigned int)n;
    return OK;
}

nvmlReturn_t nvmlDeviceGetProcessesUtilizationInfo(nvmlDevice_t d,
                                                   nvmlProcessesUtilizationInfo_t *info) {
    if (info == NULL || info->version != ((unsigned int)sizeof *info | (1u << 24)))
        return E_ARGUMENT_VERSION_MISMATCH;
    ENTER(d, "process_utilization");
    struct proc procs[MAX_PROCS];
    int n = utilization_procs(d, procs);
    if (info->procUtilArray == NULL || info->processSamplesCount < (unsigned int)n) {
        info->processSamplesCount = (unsigned int)n;
        return n == 0 ? OK : E_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) {
        nvmlProcessUtilizationInfo_v1_t *s = &info->procUtilArray[i];
        memset(s, 0, sizeof *s);
        s->pid = procs[i].pid;
        s->timeStamp = now_ms() * 1000ull;
        s->smUtil = procs[i].sm;
    }
    info->processSamplesCount = (unsigned int)n;
    return OK;
}

/* ------------------------------------------------------------------ events */
#define MAX_REGISTRATIONS 64
#define MAX_DELIVERED 1024

struct event_set {
    int n;
    int gpu[MAX_REGISTRATIONS];
    unsigned long long types[MAX_REGISTRATIONS];
};

static char delivered[MAX_DELIVERED][KEY_LEN];
static int n_delivered;

static void n_delivered_reset(void) { n_delivered = 0; }

nvmlReturn_t nvmlEventSetCreate(struct event_set **set) {
    if (init_count <= 0) return E_UNINITIALIZED;
    if (set == NULL) return E_INVALID_ARGUMENT;
    *set = calloc(1, sizeof **set);
    return *set == NULL ? 20 /* NVML_ERROR_MEMORY */ : OK;
}

nvmlReturn_t nvmlEventSetFree(struct event_set *set) {
    if (init_count <= 0) return E_UNINITIALIZED;
    free(set);
    return OK;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types) {
    ENTER(d, "supported_events");
    if (!get_num(types, "gpu.%d.supported_events", d->index)) *types = 0x18f;
    return OK;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types,
                                      struct event_set *set) {
    ENTER(d, "events");
    if (set == NULL) return E_INVALID_ARGUMENT;
    unsigned long long supported = 0x18f;
    get_num(&supported, "gpu.%d.supported_events", d->index);
    if ((types & ~supported) != 0) return E_NOT_SUPPORTED;
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = OK;
    if (set->n < MAX_REGISTRATIONS) {
        set->gpu[set->n] = d->index;
        set->types[set->n] = types;
        set->n++;
    } else {
        rc = 20;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* The first undelivered `event.ID` for this set, marked delivered; 1 when found. */
static int next_event(struct event_set *set, nvmlEventData_t *data) {
    int found = 0;
    pthread_mutex_lock(&lock);
    reload();
    for (int i = 0; i < n_entries && !found; i++) {
        if (strncmp(entries[i].key, "event.", 6) != 0) continue;
        const char *id = entries[i].key + 6;
        if (strchr(id, '.') != NULL) continue; /* event_wait.* and similar */
        int seen = 0;
        for (int j = 0; j < n_delivered && !seen; j++) seen = strcmp(delivered[j], id) == 0;
        if (seen) continue;
        int gpu;
        long long type, value;
        if (sscanf(entries[i].val, "%d,%lli,%lli", &gpu, &type, &value) != 3) continue;
        for (int r = 0; r < set->n; r++) {
            if (set->gpu[r] == gpu && (set->types[r] & (unsigned long long)type) != 0) {
                found = 1;
                break;
            }
        }
        if (!found || gpu < 0 || gpu >= MAX_GPUS) {
            found = 0;
            continue;
        }
        if (n_delivered < MAX_DELIVERED) snprintf(delivered[n_delivered++], KEY_LEN, "%s", id);
        gpus[gpu].index = gpu;
        gpus[gpu].mig = -1;
        data->device = &gpus[gpu];
        data->eventType = (unsigned long long)type;
        data->eventData = (unsigned long long)value;
        data->gpuInstanceId = 0xFFFFFFFFu;
        data->computeInstanceId = 0xFFFFFFFFu;
    }
    pthread_mutex_unlock(&lock);
    return found;
}

nvmlReturn_t nvmlEventSetWait_v2(struct event_set *set, nvmlEventData_t *data,
                                 unsigned int timeout_ms) {
    if (init_count <= 0) return E_UNINITIALIZED;
    if (set == NULL || data == NULL) return E_INVALID_ARGUMENT;
    unsigned long long start = now_ms(), block = 0, code;
    for (;;) { /* event_wait.sleep_ms, re-read while waiting */
        block = 0;
        get_num(&block, "event_wait.sleep_ms");
        if (now_ms() - start >= block) break;
        nap_ms(20);
    }
    if (get_num(&code, "event_wait.error")) return (nvmlReturn_t)code;
    unsigned long long begin = now_ms();
    for (;;) {
        if (next_event(set, data)) return OK;
        unsigned long long waited = now_ms() - begin;
        if (waited >= timeout_ms) return E_TIMEOUT;
        unsigned long long left = timeout_ms - waited;
        nap_ms(left < 10 ? left : 10);
    }
}

/* ------------------------------------------------------------------ GPM */
nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t d, nvmlGpmSupport_t *support) {
    if (support == NULL || support->version != 1) return E_ARGUMENT_VERSION_MISMATCH;
    ENTER(d, "gpm");
    unsigned long long v = 0;
    get_num(&v, "gpu.%d.gpm.supported", d->index);
    support->isSupportedDevice = (unsigned int)(v != 0);
    return OK;
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample) {
    if (init_count <= 0) return E_UNINITIALIZED;
    if (sample == NULL) return E_INVALID_ARGUMENT;
    *sample = calloc(1, sizeof **sample);
    return *sample == NULL ? 20 : OK;
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample) {
    if (init_count <= 0) return E_UNINITIALIZED;
    free(sample);
    return OK;
}

/* Whether the caller may read profiling counters: root, unless the scenario says otherwise. */
static int caller_is_admin(void) {
    unsigned long long admin = geteuid() == 0;
    get_num(&admin, "caller.admin");
    return admin != 0;
}

static nvmlReturn_t gpm_sample(nvmlDevice_t d, int gpu_instance, nvmlGpmSample_t sample) {
    ENTER(d, "gpm");
    if (sample == NULL) return E_INVALID_ARGUMENT;
    unsigned long long v = 0, admin_only = 0;
    get_num(&v, "gpu.%d.gpm.supported", d->index);
    if (v == 0) return E_NOT_SUPPORTED;
    get_num(&admin_only, "gpu.%d.gpm.admin_only", d->index);
    if (admin_only && !caller_is_admin()) return E_NO_PERMISSION;
    sample->device = d;
    sample->gpu_instance = gpu_instance;
    sample->taken_ns = now_ms() * 1000000ull;
    return OK;
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t d, nvmlGpmSample_t sample) {
    return gpm_sample(d, -1, sample);
}

nvmlReturn_t nvmlGpmMigSampleGet(nvmlDevice_t d, unsigned int gpu_instance,
                                 nvmlGpmSample_t sample) {
    return gpm_sample(d, (int)gpu_instance, sample);
}

nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *get) {
    if (init_count <= 0) return E_UNINITIALIZED;
    if (get == NULL || get->version != 1) return E_ARGUMENT_VERSION_MISMATCH;
    nvmlGpmSample_t s1 = get->sample1, s2 = get->sample2;
    if (s1 == NULL || s2 == NULL || s1->device == NULL || s2->device != s1->device ||
        s2->gpu_instance != s1->gpu_instance)
        return E_INVALID_ARGUMENT;
    int index = s2->device->index;
    int pin_ __attribute__((cleanup(unpin))) = 0;
    (void)pin_;
    pin_world(); /* one check of the scenario for all the metrics, as for a device call */
    for (unsigned int i = 0; i < get->numMetrics; i++) {
        nvmlGpmMetric_t *m = &get->metrics[i];
        double value = 0;
        int found = s2->gpu_instance < 0
                        ? get_double(&value, "gpu.%d.gpm.%u", index, m->metricId)
                        : get_double(&value, "gpu.%d.mig.%d.gpm.%u", index, s2->gpu_instance,
                                     m->metricId);
        m->nvmlReturn = found ? OK : E_NOT_SUPPORTED;
        m->value = found ? value : 0;
        m->metricInfo.shortName = NULL;
        m->metricInfo.longName = NULL;
        m->metricInfo.unit = NULL;
    }
    return OK;
}
