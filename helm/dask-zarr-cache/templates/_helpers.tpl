{{/*
Chart name, truncated to 63 characters.
*/}}
{{- define "dask-zarr-cache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: "<release>-<chart>" unless the release already contains the
chart name. Truncated so that suffixes like "-scheduler" still fit in 63 characters.
*/}}
{{- define "dask-zarr-cache.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the scheduler Deployment and Service.
*/}}
{{- define "dask-zarr-cache.schedulerName" -}}
{{- printf "%s-scheduler" (include "dask-zarr-cache.fullname" .) }}
{{- end }}

{{/*
Name of the worker Deployment.
*/}}
{{- define "dask-zarr-cache.workerName" -}}
{{- printf "%s-worker" (include "dask-zarr-cache.fullname" .) }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "dask-zarr-cache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "dask-zarr-cache.labels" -}}
helm.sh/chart: {{ include "dask-zarr-cache.chart" . }}
{{ include "dask-zarr-cache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels (add app.kubernetes.io/component per workload).
*/}}
{{- define "dask-zarr-cache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dask-zarr-cache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Scheduler address the workers dial.
*/}}
{{- define "dask-zarr-cache.schedulerAddress" -}}
{{- printf "tcp://%s:8786" (include "dask-zarr-cache.schedulerName" .) }}
{{- end }}

{{/*
Bytes in a Kubernetes quantity such as 500Mi, 50Gi, 1Ti, 100G or 1073741824, as a float.
*/}}
{{- define "dask-zarr-cache.quantityBytes" -}}
{{- $q := toString . | trim }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- if not $number }}
{{- fail (printf "cache.size %q is not a Kubernetes quantity like 50Gi" $q) }}
{{- end }}
{{- $suffix := trimPrefix $number $q }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 }}
{{- if not (hasKey $units $suffix) }}
{{- fail (printf "cache.size %q has unknown unit %q (use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E)" $q $suffix) }}
{{- end }}
{{- mulf (float64 $number) (get $units $suffix) }}
{{- end }}

{{/*
Cache budget per worker (DASK_ZARR_CACHE__MAX_SIZE): cache.maxSize if set, else
floor(cache.size in bytes * cache.fillFraction) as an integer number of bytes.
*/}}
{{- define "dask-zarr-cache.maxSize" -}}
{{- $max := .Values.cache.maxSize }}
{{- if kindIs "string" $max }}
{{- $max | trim }}
{{- else if not (kindIs "invalid" $max) }}
{{- int64 $max }}
{{- else }}
{{- $bytes := include "dask-zarr-cache.quantityBytes" .Values.cache.size }}
{{- mulf (float64 $bytes) .Values.cache.fillFraction | floor | int64 }}
{{- end }}
{{- end }}

{{/*
Cache environment, identical for the scheduler and the workers: the scheduler's preload
registers the plugin with the scheduler's settings.
*/}}
{{- define "dask-zarr-cache.cacheEnv" -}}
- name: DASK_ZARR_CACHE__MAX_SIZE
  value: {{ include "dask-zarr-cache.maxSize" . | quote }}
- name: DASK_ZARR_CACHE__DIRECTORY
  value: {{ .Values.cache.mountPath | quote }}
- name: DASK_ZARR_CACHE__INDEX_SHARDS
  value: {{ int64 .Values.cache.indexShards | toString | quote }}
- name: DASK_ZARR_CACHE__FILE_MODE
  value: {{ .Values.cache.fileMode | toString | quote }}
- name: DASK_ZARR_CACHE__TRUSTED_PARENT
  {{- $trusted := .Values.cache.trustedParent }}
  {{- if kindIs "invalid" $trusted }}
  {{- $trusted = ne .Values.cache.volume.type "hostPath" }}
  {{- end }}
  value: {{ ternary "true" "false" $trusted | quote }}
{{- if not (kindIs "invalid" .Values.cache.maxAgeSeconds) }}
- name: DASK_ZARR_CACHE__MAX_AGE_SECONDS
  {{- $age := float64 .Values.cache.maxAgeSeconds }}
  {{- if eq $age (floor $age) }}
  value: {{ int64 $age | toString | quote }}
  {{- else }}
  value: {{ $age | toString | quote }}
  {{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod scheduling constraints shared by the scheduler and the workers.
*/}}
{{- define "dask-zarr-cache.placement" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
