{{/*
Chart name (or nameOverride), at most 63 characters.
*/}}
{{- define "scopehold.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: fullnameOverride, else "<release>" when the release name
already contains the chart name, else "<release>-<chart>". Kept at 50 characters so
that "-controller" and similar suffixes still fit a DNS label.
*/}}
{{- define "scopehold.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "scopehold.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "scopehold.labels" -}}
helm.sh/chart: {{ include "scopehold.chart" . }}
{{ include "scopehold.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: scopehold
{{- end }}

{{/*
Selector labels (immutable once deployed: never add to them).
*/}}
{{- define "scopehold.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scopehold.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Component labels: pass (list $ "controller").
*/}}
{{- define "scopehold.componentLabels" -}}
{{ include "scopehold.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "scopehold.componentSelectorLabels" -}}
{{ include "scopehold.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
ServiceAccount names.
*/}}
{{- define "scopehold.controllerServiceAccountName" -}}
{{- default (printf "%s-controller" (include "scopehold.fullname" .)) .Values.controller.serviceAccount.name }}
{{- end }}

{{- define "scopehold.nodeServiceAccountName" -}}
{{- default (printf "%s-node" (include "scopehold.fullname" .)) .Values.node.serviceAccount.name }}
{{- end }}

{{/*
The ScopeHold image reference.
*/}}
{{- define "scopehold.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Custody: Service name, TLS object names, and the address node plugins dial.
*/}}
{{- define "scopehold.custodyServiceName" -}}
{{- printf "%s-custody" (include "scopehold.fullname" .) }}
{{- end }}

{{- define "scopehold.custodyTlsSecretName" -}}
{{- default (printf "%s-custody-tls" (include "scopehold.fullname" .)) .Values.custody.tls.secretName }}
{{- end }}

{{- define "scopehold.digestKeySecretName" -}}
{{- printf "%s-digest-key" (include "scopehold.fullname" .) }}
{{- end }}

{{- define "scopehold.custodyCaConfigMapName" -}}
{{- default (printf "%s-custody-ca" (include "scopehold.fullname" .)) .Values.custody.tls.caConfigMapName }}
{{- end }}

{{/*
The proxy-sidecar admission webhook: its configuration's name, and whether it
runs (it serves with custody's certificate, so it needs custody TLS).
*/}}
{{- define "scopehold.proxyInjectorName" -}}
{{- printf "%s-proxy-injector" (include "scopehold.fullname" .) }}
{{- end }}

{{- define "scopehold.proxyInjectorCondition" -}}
has(object.metadata.annotations) && 'scopehold.dev/inject' in object.metadata.annotations && object.metadata.annotations['scopehold.dev/inject'] == 'proxy'
{{- end }}

{{/*
Where injected sidecars report their uses: the webhook listener's /usage at
custody's address (the serving certificate covers it).
*/}}
{{- define "scopehold.proxyUsageUrl" -}}
{{- if .Values.custody.address }}
{{- $host := .Values.custody.address | toString }}
{{- if contains ":" $host }}{{- $host = printf "[%s]" $host }}{{- end }}
{{- printf "https://%s:%v/usage" $host .Values.proxyInjector.port }}
{{- else }}
{{- printf "https://%s.%s.svc:%v/usage" (include "scopehold.custodyServiceName" .) .Release.Namespace .Values.proxyInjector.port }}
{{- end }}
{{- end }}

{{- define "scopehold.proxyInjectorEnabled" -}}
{{- if and .Values.proxyInjector.enabled (ne (include "scopehold.custodyPlaintext" .) "true") }}
{{- "true" }}
{{- end }}
{{- end }}

{{/*
Whether custody runs in plaintext. Refuses inconsistent values instead of guessing:
plaintext needs both tls.enabled=false and plaintext=true.
*/}}
{{- define "scopehold.custodyPlaintext" -}}
{{- if .Values.custody.tls.enabled }}
{{- if .Values.custody.plaintext }}
{{- fail "custody.plaintext=true contradicts custody.tls.enabled=true: set custody.tls.enabled=false as well (development only) or drop custody.plaintext" }}
{{- end }}
{{- else }}
{{- if not .Values.custody.plaintext }}
{{- fail "custody.tls.enabled=false sends secret values in clear text: also set custody.plaintext=true to confirm (development only)" }}
{{- end }}
{{- "true" }}
{{- end }}
{{- end }}

{{- define "scopehold.custodyEndpoint" -}}
{{- $scheme := ternary "http" "https" (eq (include "scopehold.custodyPlaintext" .) "true") }}
{{- if .Values.custody.address }}
{{- $host := .Values.custody.address | toString }}
{{- if contains ":" $host }}{{- $host = printf "[%s]" $host }}{{- end }}
{{- printf "%s://%s:%v" $scheme $host .Values.custody.port }}
{{- else }}
{{- printf "%s://%s.%s.svc:%v" $scheme (include "scopehold.custodyServiceName" .) .Release.Namespace .Values.custody.port }}
{{- end }}
{{- end }}

{{/*
Common environment of ScopeHold containers (log format and filter).
*/}}
{{- define "scopehold.logEnv" -}}
- name: SCOPEHOLD_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The leader-election Lease (in the release namespace).
*/}}
{{- define "scopehold.leaseName" -}}
{{- printf "%s-controller" (include "scopehold.fullname" .) }}
{{- end }}

{{/*
Host networking: the pod spec lines, and a check that the API server override is whole.
*/}}
{{- define "scopehold.hostNetwork" -}}
{{- if .Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- end }}

{{- define "scopehold.apiServerEnv" -}}
{{- if or .Values.apiServer.host .Values.apiServer.port }}
{{- if not (and .Values.apiServer.host .Values.apiServer.port) }}
{{- fail "apiServer.host and apiServer.port go together: set both or neither" }}
{{- end }}
# The API server address for kube-proxy-free clusters (apiServer.*): what
# in-cluster configuration reads instead of the kubernetes Service.
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.apiServer.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.apiServer.port | quote }}
{{- end }}
{{- end }}
